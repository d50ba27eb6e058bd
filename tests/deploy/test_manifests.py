"""Kubernetes manifests: every rendered object validates offline against the Kubernetes JSON schemas
(strict: unknown fields are errors), and the wiring between objects is what the design says.

The Secrets are not rendered (the operator creates them before the first apply, so an apply never
overwrites them): k8s/secrets.example.yaml shows their names and keys, and the workloads are
checked against it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from .kustomize import build, load_yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
EXAMPLE_SECRETS = K8S / "secrets.example.yaml"  # not applied: names, keys and placeholder values
OVERLAYS = ("cpu", "gpu")
# The oldest and newest Kubernetes minor versions we promise to deploy on.
VERSIONS = ("1.29.0", "1.37.0")
HEALTH_PORT = 8081
GRPC_PORTS = {"memlong-gateway": 50051, "memlong-decoder": 50071, "memlong-retmem": 50061}
HTTP_PORT = 8080  # the gateway's OpenAI-compatible HTTP API


def rendered(overlay: str) -> list[dict[str, Any]]:
    return build(K8S / "overlays" / overlay)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def example_secrets() -> dict[str, dict[str, Any]]:
    """The Secrets the operator creates, as k8s/secrets.example.yaml shows them (name -> object)."""
    return by_kind(load_yaml(EXAMPLE_SECRETS), "Secret")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_schemas(overlay: str, version: str) -> None:
    docs = rendered(overlay)
    assert len(docs) >= 15
    for doc in docs + load_yaml(EXAMPLE_SECRETS):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_services_and_probes(overlay: str) -> None:
    from memlong.cli import build_parser

    docs = rendered(overlay)
    loads, services = workloads(docs), by_kind(docs, "Service")
    assert {n: d["kind"] for n, d in loads.items()} == {
        "memlong-retmem": "StatefulSet",
        "memlong-decoder": "Deployment",
        "memlong-gateway": "Deployment",
    }
    for name, load in loads.items():
        labels = load["spec"]["template"]["metadata"]["labels"]
        assert selects(load["spec"]["selector"]["matchLabels"], labels)
        svc = services[name]
        assert selects(svc["spec"]["selector"], labels), f"Service {name} selects no pod of {name}"
        http = [HTTP_PORT] if name == "memlong-gateway" else []
        assert [p["port"] for p in svc["spec"]["ports"]] == [GRPC_PORTS[name], *http]
        (container,) = pod_spec(load)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == GRPC_PORTS[name] and ports["health"] == HEALTH_PORT
        assert f"--port={GRPC_PORTS[name]}" in container["args"]
        # gRPC health probes on the plaintext health-only port; the gateway is ready when its HTTP API
        # answers /readyz (which asks the gRPC API's health), over TLS as the public policy says.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if name == "memlong-gateway" and probe == "readinessProbe":
                get = container[probe]["httpGet"]
                assert (get["path"], ports[get["port"]], get["scheme"]) == ("/readyz", HTTP_PORT, "HTTPS")
                args = build_parser().parse_args(container["args"])  # the CLI takes them as written
                assert args.http_port == HTTP_PORT and args.http_gateway_server_name == "memlong-gateway"
                svc_http = next(p for p in svc["spec"]["ports"] if p["port"] == HTTP_PORT)
                assert ports[svc_http["targetPort"]] == HTTP_PORT
                continue
            assert container[probe]["grpc"]["port"] == HEALTH_PORT, (name, probe)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod_spec(load)["securityContext"]["runAsNonRoot"] is True
        assert "memory" in container["resources"]["limits"]
        assert container["image"] == f"memlong:{overlay}"
    config = by_kind(docs, "ConfigMap")["memlong-config"]["data"]
    assert config["MEMLONG_HEALTH_ADDRESS"].endswith(f":{HEALTH_PORT}")


def environment(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """A container's environment: its ConfigMaps (envFrom), then its own `env` values on top."""
    maps = by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        env.update(maps[ref["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def mounted_secrets(load: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """mount path -> Secret name, for the container's Secret volumes."""
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod_spec(load)["volumes"] if "secret" in v}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if m["name"] in volumes}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_settings_mtls_inside_api_keys_at_the_edge(overlay: str) -> None:
    """Internal hops (decoder and ret-mem ports, every channel) require client certificates; the
    gateway's public port is TLS without them (separate policies, memlong/rpc/tls.py)."""
    docs = rendered(overlay)
    tls_files = set(example_secrets()["memlong-tls"]["stringData"])
    for name, load in workloads(docs).items():
        (container,) = pod_spec(load)["containers"]
        env = environment(docs, container)
        assert env.get("MEMLONG_TLS_CLIENT_AUTH", "none") == "none", name
        assert env["MEMLONG_INTERNAL_TLS_CLIENT_AUTH"] == "require", name
        assert "MEMLONG_INTERNAL_TLS" not in env, name  # not switched off
        for prefix in ("MEMLONG_TLS_", "MEMLONG_INTERNAL_TLS_"):
            files = [Path(env[prefix + k]) for k in ("CERT", "KEY", "CA")]
            assert mounted_secrets(load, container)[str(files[0].parent)] == "memlong-tls", name
            assert {f.parent for f in files} == {files[0].parent} and {f.name for f in files} == tls_files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_gets_the_internal_secret(overlay: str) -> None:
    """The decoder and ret-mem refuse callers without the installation secret, and the gateway and the
    decoder send it: all three read it from the Secret memlong-internal (MEMLONG_INTERNAL_TOKEN_FILE)."""
    docs = rendered(overlay)
    secret = example_secrets()["memlong-internal"]
    assert set(secret["stringData"]) == {"internal.key"}
    loads = workloads(docs)
    assert set(loads) == set(GRPC_PORTS)
    for name, load in loads.items():
        (container,) = pod_spec(load)["containers"]
        token_file = Path(environment(docs, container)["MEMLONG_INTERNAL_TOKEN_FILE"])
        assert mounted_secrets(load, container).get(str(token_file.parent)) == "memlong-internal", name
        assert token_file.name in secret["stringData"], name
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent))
        assert mount.get("readOnly") is True, name


def test_the_internal_secret_placeholder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Created from the example as it stands, the placeholder would be a secret everyone knows: the
    services refuse it."""
    from memlong.errors import InvalidArgument
    from memlong.rpc.internal import token_from_env

    (placeholder,) = example_secrets()["memlong-internal"]["stringData"].values()
    path = tmp_path / "internal.key"
    monkeypatch.delenv("MEMLONG_INTERNAL_TOKEN", raising=False)
    monkeypatch.setenv("MEMLONG_INTERNAL_TOKEN_FILE", str(path))
    for text in (placeholder, "short"):
        path.write_text(text)
        with pytest.raises(InvalidArgument, match="MEMLONG_INTERNAL_TOKEN_FILE"):
            token_from_env()
    path.write_text("0123456789abcdef0123456789abcdef\n")
    assert token_from_env() == "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retmem_is_a_statefulset_with_volumes_behind_a_headless_service(overlay: str) -> None:
    docs = rendered(overlay)
    sts = by_kind(docs, "StatefulSet")["memlong-retmem"]
    headless = by_kind(docs, "Service")[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = pod_spec(sts)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data" and "--data-dir=/data" in container["args"]
    # The ring in the ConfigMap names exactly the StatefulSet's pods, through the headless Service.
    config = by_kind(docs, "ConfigMap")["memlong-config"]["data"]
    replicas = sts["spec"]["replicas"]
    ring = dict(item.split("=") for item in config["MEMLONG_DECODER_RETMEM"].split(","))
    assert ring == {
        f"memlong-retmem-{i}": f"memlong-retmem-{i}.memlong-retmem:{GRPC_PORTS['memlong-retmem']}"
        for i in range(replicas)
    }
    assert config["MEMLONG_GATEWAY_RETMEM"] == config["MEMLONG_DECODER_RETMEM"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmaps_and_secrets_referenced_exist(overlay: str) -> None:
    docs = rendered(overlay)
    secrets, maps = example_secrets(), by_kind(docs, "ConfigMap")
    assert set(secrets) == {"memlong-tls", "memlong-api-keys", "memlong-internal"}
    for name, load in workloads(docs).items():
        spec = pod_spec(load)
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets, name
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in by_kind(docs, "PersistentVolumeClaim")
        for c in spec["containers"]:
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in maps, name
            mounted = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/etc/memlong/tls" in mounted, f"{name} has no TLS material"
    assert all(d["metadata"].get("namespace") == "memlong" for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_applying_an_overlay_never_touches_a_secret(overlay: str) -> None:
    """No Secret is rendered, so `kubectl apply` of an overlay, however often, leaves the Secrets the
    operator created as they are; and no placeholder value rides along in another object."""
    docs = rendered(overlay)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == []
    placeholders = [v for s in example_secrets().values() for v in s["stringData"].values()]
    assert placeholders and all(v.startswith("REPLACE") for v in placeholders)
    assert "REPLACE" not in str(docs)
    # Nothing renders the example: no kustomization under k8s/ names it.
    for kust in K8S.rglob("kustomization.yaml"):
        (spec,) = load_yaml(kust)
        assert EXAMPLE_SECRETS not in [(kust.parent / r).resolve() for r in spec.get("resources", [])], kust
    # A mistaken `kubectl apply -f` of the example does not land in the namespace either.
    assert all("namespace" not in s["metadata"] for s in example_secrets().values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budgets_cover_every_workload(overlay: str) -> None:
    docs = rendered(overlay)
    budgets = by_kind(docs, "PodDisruptionBudget")
    for name, load in workloads(docs).items():
        labels = load["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets.values() if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, name
    assert budgets["memlong-retmem"]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_allows_only_gateway_decoder_retmem(overlay: str) -> None:
    docs = rendered(overlay)
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["memlong-default-deny"]["spec"]
    assert deny["podSelector"] == {} and "ingress" not in deny and deny["policyTypes"] == ["Ingress"]

    def allowed_sources(target: str, port: int) -> set[str]:
        """Workloads (or '*' for anyone) allowed into `target` on `port`."""
        labels = workloads(docs)[target]["spec"]["template"]["metadata"]["labels"]
        out: set[str] = set()
        for pol in policies.values():
            if not selects(pol["spec"]["podSelector"].get("matchLabels", {}), labels):
                continue
            for rule in pol["spec"].get("ingress", []):
                if port not in [p["port"] for p in rule.get("ports", [])]:
                    continue
                if "from" not in rule:
                    out.add("*")
                for peer in rule.get("from", []):
                    if "namespaceSelector" in peer:
                        out.add("namespace:" + str(peer["namespaceSelector"]["matchLabels"]))
                    else:
                        out.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
        return out

    assert allowed_sources("memlong-gateway", 50051) == {"*"}
    assert allowed_sources("memlong-gateway", HTTP_PORT) == {"*"}
    assert allowed_sources("memlong-decoder", 50071) == {"memlong-gateway"}
    assert allowed_sources("memlong-retmem", 50061) == {"memlong-decoder", "memlong-gateway"}
    for name in GRPC_PORTS:
        assert allowed_sources(name, HEALTH_PORT) == {"*"}  # kubelet probes


def test_gpu_overlay_requests_one_24gb_class_gpu_and_cpu_overlay_none() -> None:
    gpu = pod_spec(workloads(rendered("gpu"))["memlong-decoder"])
    (container,) = gpu["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (term,) = gpu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    (expr,) = term["matchExpressions"]
    assert expr["key"] == "nvidia.com/gpu.memory" and 22_000 < int(expr["values"][0]) <= 24_576
    cpu_docs = rendered("cpu")
    for load in workloads(cpu_docs).values():
        for c in pod_spec(load)["containers"]:
            assert "nvidia.com/gpu" not in str(c["resources"])
    # Only the decoder differs between the overlays (and the image tag).
    gpu_docs = rendered("gpu")
    for a, b in zip(cpu_docs, gpu_docs, strict=True):
        if a["metadata"]["name"] != "memlong-decoder" or a["kind"] != "Deployment":
            assert str(a).replace("memlong:cpu", "X") == str(b).replace("memlong:gpu", "X")
