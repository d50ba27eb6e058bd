"""A small offline kustomize: the subset `k8s/` uses, so tests need no kubectl binary.

Supported: `resources` (files and directories with a kustomization.yaml), `namespace`, `labels`
(pairs, includeSelectors, includeTemplates), `images` (newName, newTag) and `patches` given as a
`path` to a strategic-merge patch (maps merge; lists of maps merge by `name`; other lists replace).
Anything else in a kustomization is an error, so the manifests cannot drift beyond what is tested.
`kubectl kustomize k8s/overlays/<name>` renders the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strategic_merge(base: Any, patch: Any) -> Any:
    """Merge `patch` into `base`: maps recursively, lists of named maps by name, anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = strategic_merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if doc["kind"] in POD_TEMPLATE_KINDS else {}
    return pod.get("containers", []) + pod.get("initContainers", [])


def build(directory: Path) -> list[dict[str, Any]]:
    """Render the kustomization in `directory` into a list of objects."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields not supported by the test renderer: {unknown}")
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs += build(path) if path.is_dir() else load_yaml(path)
    for entry in kust.get("patches", []):
        if set(entry) != {"path"}:
            raise ValueError(f"{directory}: only `path` patches are supported, got {entry}")
        for patch in load_yaml(directory / entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
            if len(matches) != 1:
                raise ValueError(f"{directory}: patch target {key} matched {len(matches)} objects")
            docs[matches[0]] = strategic_merge(docs[matches[0]], patch)
    for image in kust.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    for group in kust.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
            if doc["kind"] in POD_TEMPLATE_KINDS:
                template = doc["spec"]["template"].setdefault("metadata", {})
                if group.get("includeTemplates") or group.get("includeSelectors"):
                    template.setdefault("labels", {}).update(group["pairs"])
                if group.get("includeSelectors"):
                    doc["spec"]["selector"].setdefault("matchLabels", {}).update(group["pairs"])
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    return docs
