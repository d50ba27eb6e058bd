"""The command line loads torch only for commands that run the model: the gateway and ret-mem
processes (`memlong gateway serve`, `memlong retmem serve`) start in a fraction of a second."""

import subprocess
import sys


def test_building_the_command_line_and_the_gateway_config_does_not_import_torch():
    probe = (
        "import sys, memlong.cli as c; "
        "args = c.build_parser().parse_args(['gateway', 'serve', '--port', '0']); "
        "import memlong.services.gateway.server; "
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_the_adapter_flag_reaches_the_decoder_config():
    from memlong.cli import build_parser
    from memlong.services.decoder.config import config_from_args

    args = build_parser().parse_args(
        ["decoder", "serve", "--retmem", "s0=127.0.0.1:1", "--adapter", "runs/a"]
    )
    assert config_from_args(args).adapter == "runs/a"
    assert (
        config_from_args(build_parser().parse_args(["decoder", "serve", "--retmem", "s0=h:1"])).adapter
        is None
    )


def test_every_command_that_loads_the_model_takes_an_adapter():
    from memlong.cli import build_parser
    from memlong.deploy.ray_app.cli import config_from_args as ray_config

    parser = build_parser()
    for argv in (
        ["up"],
        ["demo"],
        ["eval", "ppl"],
        ["eval", "passkey"],
        ["train", "eval", "--variant", "trained"],
    ):
        assert parser.parse_args([*argv, "--adapter", "a"]).adapter == "a", argv
    assert ray_config(parser.parse_args(["ray", "up", "--adapter", "a"])).adapter.endswith("/a")


def test_one_default_for_the_memlong_settings_everywhere():
    """The flags take MemLongConfig's defaults (memory size included: one value, defined once), so a
    command, the Ray application and a config built in code agree."""
    from memlong.cli import build_parser
    from memlong.config import MemLongConfig
    from memlong.deploy.ray_app.cli import config_from_args as ray_config
    from memlong.flags import memlong_config
    from memlong.services.decoder.config import DecoderConfig

    assert MemLongConfig().memory_size == 1 << 20
    parser = build_parser()
    for argv in (["up"], ["demo"], ["eval", "ppl"], ["eval", "passkey"], ["eval", "icl"]):
        assert memlong_config(parser.parse_args(argv)) == MemLongConfig(), argv
    assert MemLongConfig.from_dict(ray_config(parser.parse_args(["ray", "up"])).memlong) == MemLongConfig()
    assert DecoderConfig(retmem={"s0": "h:1"}).memlong == MemLongConfig()


def test_shipped_adapters_pass_to_ray_replicas_by_name():
    from memlong.cli import build_parser
    from memlong.deploy.ray_app.cli import config_from_args as ray_config

    parser = build_parser()
    for name in ("default", "smollm2-135m-memlong"):
        assert ray_config(parser.parse_args(["ray", "up", "--adapter", name])).adapter == name


def test_the_three_text_limits_have_their_own_flags(monkeypatch):
    from memlong.cli import build_parser
    from memlong.services.decoder.config import DecoderConfig
    from memlong.services.decoder.config import config_from_args as decoder_config
    from memlong.services.gateway.config import GatewayConfig, Quotas
    from memlong.services.gateway.config import config_from_args as gateway_config

    monkeypatch.setenv("MEMLONG_API_KEYS", "key-a=tenant-a")
    parse = build_parser().parse_args
    g = gateway_config(
        parse(
            [
                "gateway",
                "serve",
                "--decoders",
                "d0=h:1",
                "--retmem",
                "s0=h:2",
                "--max-tenant-text-bytes",
                "7",
                "--max-request-text-bytes",
                "8",
            ]
        )
    )
    assert (g.quotas.max_tenant_text_bytes, g.max_request_text_bytes) == (7, 8)
    d = decoder_config(parse(["decoder", "serve", "--retmem", "s0=h:1", "--max-call-text-bytes", "9"]))
    assert d.max_call_text_bytes == 9
    g, d = (
        gateway_config(parse(["gateway", "serve", "--decoders", "d0=h:1", "--retmem", "s0=h:2"])),
        decoder_config(parse(["decoder", "serve", "--retmem", "s0=h:1"])),
    )
    assert g.quotas.max_tenant_text_bytes == Quotas().max_tenant_text_bytes  # unset: the defaults
    assert g.max_request_text_bytes == GatewayConfig.max_request_text_bytes
    assert d.max_call_text_bytes == DecoderConfig.max_call_text_bytes
    monkeypatch.setenv("MEMLONG_GATEWAY_MAX_REQUEST_TEXT_BYTES", "11")
    monkeypatch.setenv("MEMLONG_DECODER_MAX_CALL_TEXT_BYTES", "12")
    assert (
        gateway_config(
            build_parser().parse_args(["gateway", "serve", "--decoders", "d0=h:1", "--retmem", "s0=h:2"])
        ).max_request_text_bytes
        == 11
    )
    assert (
        decoder_config(
            build_parser().parse_args(["decoder", "serve", "--retmem", "s0=h:1"])
        ).max_call_text_bytes
        == 12
    )
