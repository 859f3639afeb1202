"""PRS arithmetic (ROUTET2I.md section 2): a hand-computed case, symmetry, validation, torch-freeness."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from routet2i._errors import UsageError
from routet2i.prs import metric_distances, prs, prs_from_distances

# Two prompts, two metrics. Column means: mu_e = [2, 0.7], mu_c = [1.5, 0.4]; |mu_e - mu_c| = [0.5, 0.3].
Q_E = np.array([[3.0, 0.5], [1.0, 0.9]])
Q_C = np.array([[2.0, 0.6], [1.0, 0.2]])
# D = sigmoid([[1/0.5, -0.1/0.3], [0/0.5, 0.7/0.3]]) = sigmoid([[2, -1/3], [0, 7/3]]) (eps ~ 0)
D_HAND = np.array([[0.8807970779778823, 0.4174297935376853], [0.5, 0.9116003227929417]])


def test_hand_computed_case() -> None:
    D = metric_distances(Q_E, Q_C, gamma=1.0, eps=1e-12)
    np.testing.assert_allclose(D, D_HAND, rtol=0, atol=1e-9)
    np.testing.assert_allclose(prs(Q_E, Q_C, eps=1e-12), [0.6491134357577838, 0.7058001613964708], atol=1e-9)
    # weights are normalized: [1, 3] == [0.25, 0.75]
    np.testing.assert_allclose(prs_from_distances(D, [1, 3]), 0.25 * D_HAND[:, 0] + 0.75 * D_HAND[:, 1])


def test_gamma_scales_the_gap() -> None:
    D = metric_distances(Q_E, Q_C, gamma=2.0, eps=1e-12)
    # sigmoid(1 / (2 * 0.5)) = sigmoid(1); sigmoid(-0.1 / (2 * 0.3)) = sigmoid(-1/6)
    np.testing.assert_allclose(D[0], [0.7310585786300049, 0.45842951678320004], atol=1e-9)


def test_explicit_means_override_column_means() -> None:
    D = metric_distances(Q_E, Q_C, eps=1e-12, mu_edge=[1.0, 1.0], mu_cloud=[0.0, 0.0])
    np.testing.assert_allclose(D, 1 / (1 + np.exp(-(Q_E - Q_C))), atol=1e-12)


def test_swapping_edge_and_cloud_gives_one_minus_d() -> None:
    rng = np.random.default_rng(0)
    qe, qc = rng.random((50, 4)), rng.random((50, 4))
    D = metric_distances(qe, qc, gamma=0.7)
    np.testing.assert_allclose(metric_distances(qc, qe, gamma=0.7), 1 - D, atol=1e-12)
    np.testing.assert_allclose(prs(qc, qe, gamma=0.7), 1 - prs(qe, qc, gamma=0.7), atol=1e-12)


def test_equal_means_stay_finite() -> None:
    D = metric_distances([[1.0], [0.0]], [[0.0], [1.0]])  # both means 0.5: the scale is eps
    assert np.all(np.isfinite(D))
    np.testing.assert_allclose(D[:, 0], [1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"q_edge": [[1.0, 2.0]], "q_cloud": [[1.0]]}, "same shape"),
        ({"q_edge": [[np.nan]], "q_cloud": [[1.0]]}, "q_edge"),
        ({"q_edge": [[1.0]], "q_cloud": [[np.inf]]}, "q_cloud"),
        ({"q_edge": [[1.0]], "q_cloud": [[1.0]], "gamma": 0.0}, "gamma"),
        ({"q_edge": [[1.0]], "q_cloud": [[1.0]], "eps": -1.0}, "eps"),
        ({"q_edge": [[1.0]], "q_cloud": [[1.0]], "mu_edge": [1.0, 2.0]}, "mu_edge"),
        ({"q_edge": np.zeros((2, 2, 2)), "q_cloud": np.zeros((2, 2, 2))}, "q_edge"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        metric_distances(**kwargs)


def test_bad_weights() -> None:
    D = np.full((3, 2), 0.5)
    with pytest.raises(UsageError, match="weights"):
        prs_from_distances(D, [1.0])
    with pytest.raises(UsageError, match="weights"):
        prs_from_distances(D, [1.0, -1.0])
    with pytest.raises(UsageError, match="D must lie"):
        prs_from_distances(D + 1)


def test_import_is_torch_free() -> None:
    code = "import sys, routet2i.prs; sys.exit(int(any(m in sys.modules for m in ('torch', 'pandas'))))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
