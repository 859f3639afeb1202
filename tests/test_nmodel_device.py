"""N-model routing on the device (issue 14, item 3): a synthetic N-model router bundle (an ONNX graph made
with onnx.helper, a word-level tokenizer, routing.json with ``models`` and ``budget_table``, a manifest),
`RouterSession.predict_models`, `EdgeClient.route` with budget=, models= and force= names, and generate
end to end through a real loopback server with two cloud models charging the chosen model's units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from routet2i._errors import BundleError, UsageError
from routet2i.bundle import write_manifest

MODELS = [
    {"name": "sd21", "where": "edge", "cost": 0},
    {"name": "small", "where": "cloud", "cost": 1},
    {"name": "big", "where": "cloud", "cost": 3},
]
WORDS = "a red fox in the snow blue car city at night portrait of an old man cat dog tree house".split()
# model_scores = sin(sum(token ids) * W + B): deterministic, different per prompt
W = np.array([[0.7, 1.3, 2.9]], dtype=np.float32)
B = np.array([0.0, 0.4, 0.8], dtype=np.float32)


def _graph(path: Path, k_metrics: int = 2, n_models: int = 3) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(W[:, :n_models], "W"),
        numpy_helper.from_array(B[:n_models], "B"),
        numpy_helper.from_array(np.linspace(0.1, 0.5, k_metrics, dtype=np.float32)[None, :], "W2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "i1"),
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["tot"], keepdims=1),  # [B, 1]
        helper.make_node("MatMul", ["tot", "W"], ["lin"]),
        helper.make_node("Add", ["lin", "B"], ["lin_b"]),
        helper.make_node("Sin", ["lin_b"], ["model_scores"]),  # [B, n]
        helper.make_node("MatMul", ["tot", "W2"], ["lin2"]),
        helper.make_node("Sigmoid", ["lin2"], ["metric_scores"]),  # [B, k]
        helper.make_node("Gather", ["model_scores", "i0"], ["s_edge"], axis=1),
        helper.make_node("Gather", ["model_scores", "i1"], ["s_cloud"], axis=1),
        helper.make_node("Sub", ["s_edge", "s_cloud"], ["prs"]),  # [B]: edge vs the first cloud model
    ]
    graph = helper.make_graph(
        nodes,
        "nmodel_router",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("prs", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("metric_scores", TensorProto.FLOAT, ["batch", k_metrics]),
            helper.make_tensor_value_info("model_scores", TensorProto.FLOAT, ["batch", n_models]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def nmodel_router_bundle(out: Path, **routing_extra) -> Path:
    """The synthetic N-model router bundle at ``out``: {sd21: 0; small: 1; big: 3}."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    (out / "tokenizer").mkdir(parents=True)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(out / "tokenizer" / "tokenizer.json"))
    _graph(out / "router.onnx")
    routing = {
        "format_version": 1,
        "method": "routet2i",
        "metrics": ["clip_score", "hps"],
        "weights": [1.0, 1.0],
        "edge_model": "sd21",
        "cloud_model": "small",
        "models": MODELS,
        "budget_table": [
            {"budget": 0.5, "lambda": 0.5},
            {"budget": 1.0, "lambda": 0.2},
            {"budget": 2.0, "lambda": 0.05},
        ],
        "default_budget": 1.0,
        "max_length": 16,
        "router_version": "nmodel-test-1",
        **routing_extra,
    }
    (out / "routing.json").write_text(json.dumps(routing))
    write_manifest(out, kind="router")
    return out


def _expected(prompt: str) -> np.ndarray:
    ids = [WORDS.index(w) + 2 for w in prompt.split()]
    return np.sin(sum(ids) * W[0] + B)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return nmodel_router_bundle(tmp_path_factory.mktemp("nmodel") / "router")


PROMPTS = [
    "a red fox in the snow",
    "blue car",
    "city at night",
    "portrait of an old man",
    "a cat",
    "dog tree house",
    "the red car at night",
    "an old dog in the snow",
]


def test_router_session_predicts_model_scores(bundle):
    from routet2i.router_runtime import RouterSession

    r = RouterSession(bundle)
    assert r.nmodel and r.model_names == ["sd21", "small", "big"]
    prs, metrics, ms = r.predict_models(PROMPTS)
    assert ms.shape == (len(PROMPTS), 3) and metrics.shape == (len(PROMPTS), 2)
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(ms[i], _expected(p), atol=1e-4)
    np.testing.assert_allclose(prs, ms[:, 0] - ms[:, 1], atol=1e-6)
    assert r.predict_one(PROMPTS[0])[0] == pytest.approx(float(prs[0]))


def test_a_bundle_missing_model_scores_is_refused(tmp_path):
    from routet2i.router_runtime import RouterSession

    out = nmodel_router_bundle(tmp_path / "r")
    _graph_without = out / "router.onnx"
    import onnx

    m = onnx.load(str(_graph_without))
    del m.graph.output[2]
    onnx.save(m, str(_graph_without))
    write_manifest(out, kind="router")
    with pytest.raises(BundleError, match="model_scores"):
        RouterSession(out)


def _client(bundle, tmp_path, **kw):
    from routet2i import EdgeClient

    kw.setdefault("state_file", str(tmp_path / "state.json"))
    return EdgeClient(router=bundle, decision_log=str(tmp_path / "d.jsonl"), **kw)


def test_route_picks_argmax_score_minus_lambda_cost(bundle, tmp_path):
    client = _client(bundle, tmp_path, budget=1.0, calibration="static")
    for p in PROMPTS:
        d = client.route(p)
        s = _expected(p)
        want = ["sd21", "small", "big"][int(np.argmax(s - 0.2 * np.array([0, 1, 3])))]
        assert (d.wanted_model, d.lambda_, d.budget) == (want, 0.2, 1.0)
        assert d.scores == pytest.approx(
            dict(zip(["sd21", "small", "big"], s.tolist(), strict=True)), abs=1e-4
        )
        # no cloud configured: a wanted cloud model stays on the edge, saying so
        assert (d.route, d.reason, d.model) == (
            ("edge", "router", "sd21") if want == "sd21" else ("edge", "cloud_unavailable", "sd21")
        )
    wanted = {client.route(p).wanted_model for p in PROMPTS}
    assert {"small", "big"} <= wanted  # the synthetic scores use both tiers at this lambda


def test_route_models_and_force_names(bundle, tmp_path):
    client = _client(bundle, tmp_path, budget=3.0, calibration="static")  # lambda 0.05
    p = next(p for p in PROMPTS if client.route(p).wanted_model == "big")
    assert client.route(p, models=["small"]).wanted_model in ("small", "sd21")
    assert client.route(p, models=["sd21"]).reason == "forced"
    with pytest.raises(UsageError, match=r"unknown model\(s\) \['sd4'\]; this router knows big, sd21, small"):
        client.route(p, models=["sd4"])
    assert client.route(p, force="small").wanted_model == "small"
    assert client.route(p, force="sd21").route == "edge"
    assert client.route(p, force="cloud").wanted_model == "big"
    assert client.route(p, force="cloud", models=["small"]).wanted_model == "small"
    with pytest.raises(UsageError, match="force='sd4': must be 'edge', 'cloud', a model name"):
        client.route(p, force="sd4")
    assert client.route(p, local_only=True).reason == "local_only"
    with pytest.raises(UsageError, match=r"budget=4: must be in \[0, 3\]"):
        _client(bundle, tmp_path, budget=4)
    assert _client(bundle, tmp_path / "t", target_cloud_rate=0.5).policy.target_rate == 0.5  # a budget


def test_two_model_bundles_keep_their_names(tmp_path):
    """An older bundle (no models list) routes as before; a cloud model's name as force= is the cloud."""
    out = nmodel_router_bundle(
        tmp_path / "pair", models=MODELS[:2], calibration=[{"rate": 0.5, "alpha": 0.0}], budget_table=None
    )
    client = _client(out, tmp_path, target_cloud_rate=0.5)
    assert not client.policy.nmodel
    d = client.route("a red fox", force="small")
    assert (d.reason, d.cost, d.lambda_) == ("cloud_unavailable", None, None)
    assert client.route("a red fox", force="sd21").route == "edge"


class _Edge:
    model_name = "sd21"

    def __call__(self, prompt, **kw):
        from PIL import Image

        return Image.new("RGB", (8, 8))


def test_generate_charges_the_chosen_models_units(bundle, tmp_path, store_url):
    from routet2i.cloud_server import BackgroundServer, NoOpPipeline, ServerConfig, open_store

    store = open_store(store_url)
    token = store.add_device("cam", quota=100, period="total")
    pipes = {"small": NoOpPipeline(model_name="small"), "big": NoOpPipeline(model_name="big")}
    srv = BackgroundServer(
        store, pipes, config=ServerConfig(default_steps=1, batch_window_s=0.0), costs={"small": 1, "big": 3}
    )
    try:
        client = _client(
            bundle, tmp_path, edge=_Edge(), cloud=srv.address, token=token, budget=3.0, calibration="static",
            deadline_s=20.0,
        )  # fmt: skip
        used = 0
        seen = set()
        for p in PROMPTS:
            r = client.generate(p, seed=1)
            if r.route == "cloud":
                assert r.model in ("small", "big") and r.cost == {"small": 1, "big": 3}[r.model]
                used += int(r.cost)
                assert r.quota["used"] == used  # the server charged the chosen model's units
            else:
                assert (r.model, r.cost) == ("sd21", 0.0)
            seen.add(r.model)
        r = client.generate(PROMPTS[0], seed=1, force="big")
        used += 3
        assert (r.route, r.model, r.quota["used"]) == ("cloud", "big", used)
        r = client.generate(PROMPTS[0], seed=1, force="cloud", models=["small"])
        used += 1
        assert (r.model, r.quota["used"]) == ("small", used)
        assert store.quota("cam").used == used
        assert {"small", "big"} <= seen
        assert (len(pipes["small"].calls) > 0, len(pipes["big"].calls) > 0) == (True, True)
        rec = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[-1])
        assert (rec["model"], rec["cost"]) == ("small", 1.0)
        client.close()
        # edge-generate --model NAME / --budget: the named cloud model, charged its units
        from routet2i.cli import main

        env = {
            "ROUTET2I_ROUTER": str(bundle), "ROUTET2I_CLOUD": srv.address, "ROUTET2I_TOKEN": token,
            "ROUTET2I_STATE_FILE": str(tmp_path / "cli-state.json"), "ROUTET2I_DECISION_LOG": "",
        }  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            out = tmp_path / "cli.png"
            assert main(["a red fox", "-o", str(out), "--model", "big", "--budget", "2.5", "--json"]) == 0
            assert main(["a red fox", "-o", str(out), "--model", "big", "--force", "edge"]) == 2
        assert store.quota("cam").used == used + 3
    finally:
        srv.stop(0.5)
        store.close()
