"""Layers of the device SDK: `EdgeClient` (sdk/client.py) never builds or reads protobuf messages (the cloud
client translates to and from `CloudRequest` / `CloudResult`); `ClientConfig` is nested by section as
``routet2i.toml`` is, and every flat option name still works; `generate` is a few steps of readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from PIL import Image
from routet2i import CloudConfig, EdgeClient, GenerationConfig, LogConfig, PolicyConfig, UsageError
from routet2i.cloud_client import CircuitBreaker, CloudClient
from routet2i.config import FLAT_FIELDS, ClientConfig, load_config
from routet2i.policy import RoutingPolicy

CLIENT = Path(__file__).resolve().parents[1] / "sdk" / "client.py"
# protobuf modules, message accessors and translators that belong to routet2i.cloud_client
WIRE_NAMES = {"cloud_pb2", "cloud_pb2_grpc", "HasField", "image_png", "quota_from_proto", "GenerateRequest"}
WIRE_PACKAGES = ("routet2i.cloud", ".cloud")  # the generated protobuf modules live in routet2i.cloud.v1


def _is_wire(name: str) -> bool:
    return (
        name in WIRE_NAMES or name in WIRE_PACKAGES or name.startswith(tuple(p + "." for p in WIRE_PACKAGES))
    )


def wire_references(source: str) -> list[str]:
    """'line: what' for every protobuf name, attribute or import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names] + [a.asname or "" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            full = [module + a.name if module.endswith(".") else f"{module}.{a.name}" for a in node.names]
            names = [module, *full] + [a.name for a in node.names] + [a.asname or "" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in WIRE_NAMES:
            names = [node.value]  # getattr(resp, "image_png"), resp.HasField("quota")...
        found += [f"{node.lineno}: {n}" for n in names if _is_wire(n)]
    return found


def test_edge_client_never_touches_protobuf():
    assert wire_references(CLIENT.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "from routet2i.cloud.v1 import cloud_pb2",
        "import routet2i.cloud.v1.cloud_pb2 as pb",
        "from .cloud.v1 import cloud_pb2_grpc",
        "from routet2i.cloud import v1",
        "from . import cloud",
        "from routet2i.cloud_client import quota_from_proto",
        "def f(resp):\n    return resp.image_png",
        "def f(resp):\n    return resp.HasField('quota')",
        "def f(m):\n    return m.cloud_pb2.GenerateRequest()",
    ],
)
def test_the_layer_check_catches_each_kind_of_reference(snippet):
    assert wire_references(snippet), snippet


# --- nested config


def test_sections_hold_their_fields_and_flat_names_route_to_them():
    cfg = ClientConfig(
        cloud="host:1", token="tok-secret", deadline_s=30, target_cloud_rate=0.3, strict=True, state_file="",
        num_inference_steps=12, scheduler="PNM", check_hashes="always",
    )  # fmt: skip
    assert isinstance(cfg.cloud, CloudConfig) and cfg.cloud.endpoint == "host:1"
    assert (cfg.cloud.token, cfg.cloud.deadline_s) == ("tok-secret", 30)
    assert isinstance(cfg.policy, PolicyConfig)
    assert (cfg.policy.target_cloud_rate, cfg.policy.strict) == (0.3, True)
    assert isinstance(cfg.log, LogConfig) and cfg.log.state_file == ""
    assert isinstance(cfg.generation, GenerationConfig)
    assert (cfg.generation.num_inference_steps, cfg.generation.scheduler) == (12, "pndm")
    assert cfg.check_hashes == "always"
    # flat reads (the old attributes) give the section's values; the cloud section compares equal to its
    # endpoint and is false without one
    assert (cfg.deadline_s, cfg.target_cloud_rate, cfg.state_file, cfg.token) == (30, 0.3, "", "tok-secret")
    assert cfg.cloud == "host:1" and cfg.cloud != "host:2" and bool(cfg.cloud)
    assert not ClientConfig().cloud and ClientConfig().cloud.endpoint is None
    assert cfg.resolved_state_file() is None
    assert "tok-secret" not in repr(cfg)  # the token is not printed
    # flat writes land in the section (no shadow attribute)
    cfg.retries = 0
    cfg.cloud = "host:9"
    assert cfg.cloud.retries == 0 and cfg.cloud.endpoint == "host:9" and "retries" not in vars(cfg)
    with pytest.raises(AttributeError, match="no attribute 'deadline'"):
        cfg.deadline  # noqa: B018


def test_every_flat_name_is_accepted_and_read_back():
    assert len(FLAT_FIELDS) == 41 and FLAT_FIELDS["cloud"] == ("cloud", "endpoint")
    cfg = ClientConfig()
    for name, (section, key) in FLAT_FIELDS.items():
        holder = cfg if section is None else getattr(cfg, section)
        if name != "cloud":  # the section itself (compared with its endpoint above)
            assert getattr(cfg, name) == getattr(holder, key), name
        assert ClientConfig(**{name: getattr(holder, key)}) == cfg, name


def test_section_objects_and_flat_overrides_combine():
    policy = PolicyConfig(target_cloud_rate=0.2, calibration="static")
    cfg = ClientConfig(cloud=CloudConfig(endpoint="h:1", retries=1), policy=policy, tls=True, strict=True)
    assert (cfg.cloud.endpoint, cfg.cloud.retries, cfg.cloud.tls) == ("h:1", 1, True)
    assert (cfg.policy.target_cloud_rate, cfg.policy.calibration, cfg.policy.strict) == (0.2, "static", True)
    assert policy.strict is False  # the caller's section is copied, not changed
    with pytest.raises(UsageError, match="policy=3: must be a PolicyConfig"):
        ClientConfig(policy=3)
    with pytest.raises(UsageError, match="must be a CloudConfig or the endpoint"):
        ClientConfig(cloud=5)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['deadline'\]; allowed: .*deadline_s"):
        ClientConfig(deadline="3")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CloudConfig(deadline_s=0), "deadline_s=0: must be a positive number of seconds"),
        (lambda: CloudConfig(retries=-1), "retries=-1: must be an integer >= 0"),
        (lambda: CloudConfig(client_cert="c.pem"), "give both"),
        (lambda: PolicyConfig(target_cloud_rate=2), r"target_cloud_rate=2: must be a number in \[0, 1\]"),
        (lambda: PolicyConfig(budget=0.3, target_cloud_rate=0.4), "give one"),
        (lambda: PolicyConfig(calibration_window=0), "calibration_window=0"),
        (lambda: LogConfig(save_prompt="no"), "save_prompt='no': must be true or false"),
        (lambda: GenerationConfig(scheduler="lms"), "unknown scheduler; allowed: dpm"),
        (lambda: ClientConfig(check_hashes="sometimes"), "allowed: first, always, never"),
        (lambda: ClientConfig(pacing_window_s=-1), "pacing_window_s=-1"),
    ],
)
def test_each_section_checks_its_own_fields(make, match):
    with pytest.raises(UsageError, match=match):
        make()


def test_toml_sections_fill_the_sections(tmp_path):
    toml = tmp_path / "routet2i.toml"
    toml.write_text(
        'edge = "bundles/edge"\n[cloud]\nendpoint = "h:1"\nretries = 1\n[policy]\nbudget = 0.4\n'
        "[log]\nlog_prompts = true\n[generation]\nwidth = 64\n"
    )
    cfg = load_config(toml, environ={"ROUTET2I_TOKEN": "tok", "ROUTET2I_BREAKER_RESET_S": "7"})
    assert cfg.edge == str(tmp_path / "bundles" / "edge")
    assert (cfg.cloud.endpoint, cfg.cloud.retries, cfg.cloud.token) == ("h:1", 1, "tok")
    assert cfg.cloud.breaker_reset_s == 7.0
    assert (cfg.policy.budget, cfg.policy.target_cloud_rate) == (0.4, 0.4)
    assert cfg.log.log_prompts is True and cfg.generation.width == 64


def test_policy_and_cloud_client_from_their_sections():
    policy = RoutingPolicy.from_config(
        None,
        PolicyConfig(target_cloud_rate=0.25, pacing=False, calibration="static", local_only_keywords=["x"]),
    )
    assert (policy.target_rate, policy.pacing, policy.calibration) == (0.25, False, "static")
    assert policy.local_only.matches("an x here")
    client = CloudClient.from_config(
        CloudConfig(endpoint="127.0.0.1:1", token="t", retries=0, deadline_s=3, breaker_failures=2)
    )
    try:
        assert (client.target, client.retries, client.deadline_s) == ("127.0.0.1:1", 0, 3)
        assert isinstance(client.breaker, CircuitBreaker) and client.breaker.failures == 2
    finally:
        client.close()


def _edge(prompt, **kwargs):
    return Image.new("RGB", (8, 8), "red")


def test_edge_client_takes_flat_options_and_sections():
    with EdgeClient(
        edge=_edge, target_cloud_rate=0.3, state_file="", decision_log="", retries=1, strict=True
    ) as c:
        assert (c.config.policy.target_cloud_rate, c.config.policy.strict) == (0.3, True)
        assert c.config.cloud.retries == 1 and c.policy.target_rate == 0.3
    with EdgeClient(edge=_edge, log=LogConfig(state_file="", decision_log=""), budget=0.5) as c:
        assert c.policy.target_rate == 0.5 and c.state.path is None
    with EdgeClient(
        edge=_edge, cloud=CloudConfig(endpoint="127.0.0.1:1", token="t"), state_file="", decision_log=""
    ) as c:
        assert c.cloud is not None and c.cloud.target == "127.0.0.1:1" and c.config.cloud.token == "t"
    with pytest.raises(
        UsageError, match=r"unknown EdgeClient option\(s\) \['deadline'\]; allowed: .*deadline_s"
    ):
        EdgeClient(edge=_edge, deadline=3)


# --- generate() in steps


def _methods() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(CLIENT.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EdgeClient")
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


def _body_lines(fn: ast.FunctionDef) -> int:
    body = (
        fn.body[1:]
        if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
        else fn.body
    )
    return body[-1].end_lineno - body[0].lineno + 1


def test_generate_is_a_few_steps_of_readable_size():
    methods = _methods()
    steps = ("_check_inputs", "_route", "_cloud_attempt", "_cloud_images", "_edge_run", "_result")
    calls = {
        n.func.attr
        for n in ast.walk(methods["generate"])
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert {"_check_inputs", "_route", "_cloud_attempt", "_edge_run", "_result"} <= calls
    sizes = {name: _body_lines(methods[name]) for name in ("generate", *steps)}
    assert all(size <= 45 for size in sizes.values()), sizes
