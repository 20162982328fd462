"""deploy/k8s: the Kubernetes manifests are valid objects, reference each other correctly, and configure the
processes the way this project's own loaders and command lines accept.

No cluster, kubectl or kustomize is needed: the kustomizations are rendered here by a small renderer that supports
exactly the kustomize features the manifests use (and fails on any other), every object is checked against the
Kubernetes OpenAPI schema (`kubernetes-validate`, strict: unknown fields are errors), and the config file, flags
and Secret templates go through `router.config.load`, `loop.config.load`, the CLI's own parser and
`router.auth.load_tokens`.
"""
from __future__ import annotations

import copy
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "production"
NAMESPACE = "specialist-router"
K8S_VERSIONS = ("1.30", "1.33")  # the oldest supported (pod-index label on by default since 1.28) and a recent one
CONFIG_MOUNT = "/etc/specialist-router"
LOG_NODE_LABEL = "specialist-router.io/log-store"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


# ------------------------------------------------------------------------------------------- rendering
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# Strategic-merge-patch merge keys of the lists the patches may touch; any other list is replaced, as SMP does
# for lists without a merge key (args, tolerations, accessModes, ...).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
               "volumeMounts": "mountPath", "ports": "containerPort"}


def _merge(base, patch, key: str = ""):
    if isinstance(patch, dict):
        assert not any(k.startswith("$") for k in patch), f"SMP directive {list(patch)} is not supported here"
        out = dict(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            out[k] = _merge(out.get(k), v, k) if v is not None else None
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(patch, list) and key in _MERGE_KEYS and isinstance(base, list):
        mk = _MERGE_KEYS[key]
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            at = next((i for i, x in enumerate(out) if x.get(mk) == item[mk]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = _merge(out[at], item, "")
        return out
    return copy.deepcopy(patch)


def _name(obj: dict) -> str:
    return obj["metadata"].get("name") or obj["metadata"]["generateName"]   # Jobs here use generateName


def _ref(obj: dict) -> tuple[str, str]:
    return obj["kind"], _name(obj)


def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` gives, minus the ConfigMap name hash, for the features used here."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images", "replicas", "patches"}
    assert set(k) <= known, f"{folder}: kustomize fields {sorted(set(k) - known)} are not rendered by this test"
    objs: list[dict] = []
    for res in k.get("resources", []):
        p = folder / res
        objs += render(p) if p.is_dir() else _docs(p)
    for gen in k.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in gen["files"]}
        objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"], "labels": dict(gen.get("options", {}).get("labels", {}))},
                     "data": data})
    if "namespace" in k:
        for o in objs:
            if o["kind"] != "Namespace":
                o["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        hits = 0
        for _, pod in _pods(objs):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c["image"].rsplit(":", 1)[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img.get('newTag', c['image'].rsplit(':', 1)[1])}"
                    hits += 1
        assert hits, f"images: {img['name']} matches no container"
    for rep in k.get("replicas", []):
        hit = [o for o in objs if o["kind"] in WORKLOADS and o["metadata"]["name"] == rep["name"]]
        assert hit, f"replicas: no workload named {rep['name']}"
        for o in hit:
            o["spec"]["replicas"] = rep["count"]
    for p in k.get("patches", []):
        assert set(p) == {"path"}, "only `patches: - path: <strategic merge patch>` is rendered here"
        for patch in _docs(folder / p["path"]):
            at = [i for i, o in enumerate(objs) if _ref(o) == _ref(patch)]
            assert len(at) == 1, f"patch {p['path']} targets {_ref(patch)}, which the resources do not hold once"
            objs[at[0]] = _merge(objs[at[0]], patch)
    return objs


def _pods(objs: list[dict]):
    """(object, pod spec) of every workload."""
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield o, o["spec"]


def _pod_labels(o: dict) -> dict:
    return o["spec"]["template"]["metadata"].get("labels", {}) if o["kind"] in WORKLOADS else o["metadata"]["labels"]


BASE_OBJS = render(BASE)
PROD_OBJS = render(OVERLAY)
SECRETS = _docs(K8S / "secrets" / "secrets.example.yaml")
JOBS = [d for p in sorted((K8S / "jobs").glob("*.yaml")) for d in _docs(p)]
DEPLOYABLE = {"base": BASE_OBJS + JOBS, "production": PROD_OBJS + JOBS}


def _one(objs: list[dict], kind: str, name: str) -> dict:
    hit = [o for o in objs if _ref(o) == (kind, name)]
    assert len(hit) == 1, f"expected one {kind}/{name}, found {len(hit)}"
    return hit[0]


def _container(objs: list[dict], kind: str, name: str, container: str) -> tuple[dict, dict]:
    pod = _one(objs, kind, name)["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == container)


def _train_job() -> dict:
    return next(j for j in JOBS if j["metadata"].get("generateName") == "train-code-")


def _flags(argv: list[str]) -> dict[str, list[str]]:
    """--flag=value / --flag value / --flag, as {flag: [values]} (in order)."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            if "=" in a:
                f, v = a.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                f, v = a, argv[i + 1]
                i += 1
            else:
                f, v = a, ""
            out.setdefault(f, []).append(v)
        i += 1
    return out


def _mount_for(pod: dict, container: dict, path: str) -> tuple[str, dict]:
    """(mountPath, volume) of the mount that holds `path` in that container (the longest matching mount)."""
    mounts = [m for m in container.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{container['name']}: no volume mounted at or above {path}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return m["mountPath"], next(v for v in pod["volumes"] if v["name"] == m["name"])


CONFIG = yaml.safe_load((BASE / "config.yaml").read_text())


# ---------------------------------------------------------------------------------------- the renderer
def test_renderer_merges_like_a_strategic_merge_patch():
    base = {"spec": {"replicas": 2, "template": {"spec": {
        "nodeSelector": {"a": "1"}, "tolerations": [{"key": "x"}],
        "containers": [{"name": "c", "args": ["--a"], "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                        "volumeMounts": [{"name": "v", "mountPath": "/v"}]},
                       {"name": "d", "image": "i"}]}}}}
    patch = {"spec": {"template": {"spec": {
        "nodeSelector": {"b": "2"}, "tolerations": [{"key": "y"}],
        "containers": [{"name": "c", "args": ["--b"], "resources": {"limits": {"cpu": "2"}},
                        "volumeMounts": [{"name": "w", "mountPath": "/v"}]}]}}}}
    got = _merge(base, patch)["spec"]["template"]["spec"]
    assert got["nodeSelector"] == {"a": "1", "b": "2"}                        # maps merge
    assert got["tolerations"] == [{"key": "y"}]                              # lists without a merge key: replaced
    c = got["containers"][0]
    assert [x["name"] for x in got["containers"]] == ["c", "d"]              # merged by name, order kept
    assert c["args"] == ["--b"] and c["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}
    assert c["volumeMounts"] == [{"name": "w", "mountPath": "/v"}]           # merged by mountPath
    assert base["spec"]["template"]["spec"]["nodeSelector"] == {"a": "1"}    # the base is not modified
    with pytest.raises(AssertionError):
        _merge(base, {"spec": {"$patch": "delete"}})


def test_overlay_patches_target_objects_of_the_base():
    k = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    base_refs = {_ref(o) for o in BASE_OBJS}
    for p in k["patches"]:
        for patch in _docs(OVERLAY / p["path"]):
            assert _ref(patch) in base_refs, f"{p['path']}: {_ref(patch)} is not in the base"
            assert patch["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    names = {o["metadata"]["name"] for o in BASE_OBJS if o["kind"] in WORKLOADS}
    assert {r["name"] for r in k["replicas"]} <= names
    prod = {_ref(o) for o in PROD_OBJS}
    assert prod == base_refs                        # the overlay changes objects, it adds or drops none
    _, vllm = _container(PROD_OBJS, "StatefulSet", "vllm", "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"             # kept from the base by the merge
    assert vllm["resources"]["requests"]["cpu"] == "12"                     # from the patch


# --------------------------------------------------------------------------------------- schema validity
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("which", ["base", "production", "secrets"])
def test_every_object_is_valid_for_kubernetes(which, version):
    objs = SECRETS if which == "secrets" else DEPLOYABLE[which]
    assert len(objs) >= 3
    for o in objs:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{_ref(o)}: {exc.message} "
                                 f"at {'.'.join(map(str, exc.path))}") from None


def test_the_validator_refuses_a_broken_object():
    """The schema check is strict: a misspelt field or a wrong type fails (so the test above can fail)."""
    bad = copy.deepcopy(_one(BASE_OBJS, "StatefulSet", "gateway"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(_one(BASE_OBJS, "StatefulSet", "vllm"))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_base_holds_every_object_the_layout_needs():
    kinds = {_ref(o) for o in BASE_OBJS}
    for ref in [("Namespace", NAMESPACE), ("ServiceAccount", "gateway"), ("ServiceAccount", "vllm"),
                ("ServiceAccount", "trainer"), ("ConfigMap", "specialist-router-config"),
                ("PersistentVolumeClaim", "specialist-router-data"),
                ("PersistentVolumeClaim", "specialist-router-logs"), ("PersistentVolumeClaim", "models"),
                ("StatefulSet", "vllm"), ("Service", "vllm"), ("StatefulSet", "gateway"), ("Service", "gateway"),
                ("PodDisruptionBudget", "serving"),
                ("Deployment", "loop")]:
        assert ref in kinds, ref
    assert {(s["kind"], s["metadata"]["name"]) for s in SECRETS} == {
        ("Secret", "gateway-auth"), ("Secret", "gateway-tls"), ("Secret", "vllm-api-key")}
    assert not [o for o in BASE_OBJS if o["kind"] == "Secret"], "Secrets stay out of the kustomization"
    for o in BASE_OBJS + JOBS + SECRETS:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE, _ref(o)


# ------------------------------------------------------------------------------------- cross-references
@pytest.mark.parametrize("which", ["base", "production"])
def test_services_select_pods_and_target_their_ports(which):
    objs = DEPLOYABLE[which]
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        pods = [(o, p) for o, p in _pods(objs) if sel.items() <= _pod_labels(o).items()]
        assert pods, f"Service {svc['metadata']['name']} selects no pod template"
        for port in svc["spec"]["ports"]:
            for o, pod in pods:
                cports = [p for c in pod["containers"] for p in c.get("ports", [])]
                t = port.get("targetPort", port["port"])
                assert any(p.get("name") == t or p["containerPort"] == t for p in cports), \
                    f"Service {svc['metadata']['name']} port {t} is not a port of {o['metadata']['name']}"


@pytest.mark.parametrize("which", ["base", "production"])
def test_workload_selectors_statefulset_services_and_disruption_budget(which):
    objs = DEPLOYABLE[which]
    for o, _ in _pods(objs):
        if o["kind"] in ("Deployment", "StatefulSet"):
            assert o["spec"]["selector"]["matchLabels"].items() <= _pod_labels(o).items(), o["metadata"]["name"]
        if o["kind"] == "StatefulSet":
            svc = _one(objs, "Service", o["spec"]["serviceName"])
            assert svc["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"
            assert svc["spec"]["selector"].items() <= _pod_labels(o).items()
    pdb = _one(objs, "PodDisruptionBudget", "serving")
    covered = {o["metadata"]["name"] for o, _ in _pods(objs)
               if pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(o).items()}
    assert covered == {"gateway", "vllm"}         # one budget over both halves of every serving pair
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("which", ["base", "production"])
def test_volumes_secrets_configmaps_claims_and_accounts_exist(which):
    objs = DEPLOYABLE[which]
    have = {_ref(o) for o in objs}
    secret_keys = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in SECRETS}
    for o, pod in _pods(objs):
        name = _name(o)
        assert ("ServiceAccount", pod["serviceAccountName"]) in have, name
        vols = {v["name"]: v for v in pod["volumes"]}
        assert len(vols) == len(pod["volumes"]), f"{name}: duplicate volume names"
        for v in vols.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in have, (name, v)
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in have, (name, v)
            if "secret" in v:
                assert v["secret"]["secretName"] in secret_keys, (name, v)
                for item in v["secret"].get("items", []):
                    assert item["key"] in secret_keys[v["secret"]["secretName"]]
        for c in pod["containers"] + pod.get("initContainers", []):
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{name}/{c['name']} mounts unknown volume {m['name']}"
                claim = vols[m["name"]].get("persistentVolumeClaim")
                if claim and claim.get("readOnly"):
                    assert m.get("readOnly"), f"{name}/{c['name']}: {m['mountPath']} of a read-only claim"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_keys.get(ref["name"], set()), (name, e["name"])


@pytest.mark.parametrize("which", ["base", "production"])
def test_probes_and_scrape_annotations_use_declared_ports(which):
    objs = DEPLOYABLE[which]
    for o, pod in _pods(objs):
        for c in pod["containers"]:
            ports = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe:
                    action = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                    assert action and action["port"] in ports, (o["metadata"]["name"], kind)
        ann = o["spec"]["template"]["metadata"].get("annotations", {}) if o["kind"] in WORKLOADS else {}
        if ann.get("prometheus.io/scrape") == "true":
            assert int(ann["prometheus.io/port"]) in {p["containerPort"] for c in pod["containers"]
                                                      for p in c.get("ports", [])}
            assert ann["prometheus.io/path"] == "/metrics"
    gw = _one(objs, "StatefulSet", "gateway")["spec"]["template"]
    assert gw["metadata"]["annotations"]["prometheus.io/scheme"] == ("https" if CONFIG["tls"]["cert_file"] else "http")


# --------------------------------------------------------------------------------- the serving pairs
def test_gateway_n_drives_vllm_n_through_the_headless_service():
    pod, gw = _container(BASE_OBJS, "StatefulSet", "gateway", "gateway")
    url = _flags(gw["args"])["--backend-url"][0]
    assert "$(POD_INDEX)" in url
    vllm = _one(BASE_OBJS, "StatefulSet", "vllm")
    assert vllm["spec"]["serviceName"] == "vllm"
    assert _one(BASE_OBJS, "Service", "vllm")["spec"]["clusterIP"] == "None"   # no load balancing across replicas
    _, vc = _container(BASE_OBJS, "StatefulSet", "vllm", "vllm")
    for n in range(vllm["spec"]["replicas"]):            # the kubelet expands $(POD_INDEX) from the env below
        u = urlsplit(url.replace("$(POD_INDEX)", str(n)))
        assert u.scheme == "http" and u.hostname == f"vllm-{n}.{vllm['spec']['serviceName']}", url  # pod DNS name
        assert u.port in {p["containerPort"] for p in vc["ports"]}
    env = {e["name"]: e for e in gw["env"]}
    assert env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    for objs in DEPLOYABLE.values():
        assert _one(objs, "StatefulSet", "gateway")["spec"]["replicas"] == \
               _one(objs, "StatefulSet", "vllm")["spec"]["replicas"] >= 2
    assert _one(BASE_OBJS, "StatefulSet", "gateway")["spec"]["replicas"] == 2


def test_vllm_serves_what_the_gateway_config_expects():
    pod, vc = _container(BASE_OBJS, "StatefulSet", "vllm", "vllm")
    assert vc["command"] == ["vllm", "serve"]
    f = _flags(vc["args"])
    model = vc["args"][0]
    assert model == CONFIG["backend"]["model"] == "/models/gpt-oss-20b"
    assert "--enable-lora" in f
    b = CONFIG["backend"]
    assert int(f["--max-loras"][0]) == b["max_loras"] == 4
    assert int(f["--max-cpu-loras"][0]) == b["max_cpu_loras"] == 16
    assert int(f["--max-lora-rank"][0]) == b["max_lora_rank"] == 64
    assert int(f["--max-model-len"][0]) == b["max_model_len"]
    assert int(f["--port"][0]) == 8000
    env = {e["name"]: e for e in vc["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "api-key"}
    _, gw = _container(BASE_OBJS, "StatefulSet", "gateway", "gateway")
    genv = {e["name"]: e for e in gw["env"]}
    assert genv["SPECIALIST_ROUTER__BACKEND__API_KEY"]["valueFrom"] == env["VLLM_API_KEY"]["valueFrom"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vc[probe]["httpGet"]["path"] == "/health"
    # the model folder is on the same volume at the same path for vLLM and the gateway
    assert _mount_for(pod, vc, model) == _mount_for(*_container(BASE_OBJS, "StatefulSet", "gateway", "gateway"), model)


@pytest.mark.parametrize("which", ["base", "production"])
def test_gpus_go_to_vllm_and_training_only(which):
    objs = DEPLOYABLE[which]
    gpu_pods = set()
    for o, pod in _pods(objs):
        name = _name(o)
        gpus = [c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in pod["containers"]]
        if any(gpus):
            gpu_pods.add(name)
            assert gpus == ["1"], name
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), name
            assert pod.get("nodeSelector"), name
    assert gpu_pods == {"vllm", "loop", "train-code-"}
    vllm = _one(objs, "StatefulSet", "vllm")["spec"]["template"]["spec"]
    terms = vllm["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": LOG_NODE_LABEL, "operator": "DoesNotExist"} in terms[0]["matchExpressions"]  # spare GPU kept free


def test_production_overlay_patches_images_replicas_gpu_nodes_and_storage():
    images = {c["image"] for _, p in _pods(PROD_OBJS) for c in p["containers"] + p.get("initContainers", [])}
    assert images == {"registry.example.com/ml/specialist-router:0.1.0", "vllm/vllm-openai:v0.32.0"}
    assert _one(PROD_OBJS, "StatefulSet", "gateway")["spec"]["replicas"] == 3
    vsel = _one(PROD_OBJS, "StatefulSet", "vllm")["spec"]["template"]["spec"]["nodeSelector"]
    assert vsel["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3" and vsel["nvidia.com/gpu.present"] == "true"
    lsel = _one(PROD_OBJS, "Deployment", "loop")["spec"]["template"]["spec"]["nodeSelector"]
    assert lsel == {LOG_NODE_LABEL: "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    classes = {o["metadata"]["name"]: o["spec"].get("storageClassName") for o in PROD_OBJS
               if o["kind"] == "PersistentVolumeClaim"}
    assert all(classes.values()), classes


# ---------------------------------------------------------------------------------- storage and paths
def _users_of(claim: str, objs: list[dict]) -> dict[str, tuple[dict, dict]]:
    out = {}
    for o, pod in _pods(objs):
        names = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
        for c in pod["containers"]:
            if any(m["name"] in names for m in c.get("volumeMounts", [])):
                out[_name(o)] = (pod, c)
    return out


def test_registry_is_the_same_path_on_the_same_volume_in_every_pod():
    registry = CONFIG["registry"]
    assert CONFIG["loop"]["registry"] == registry
    train = _train_job()["spec"]["template"]["spec"]["containers"][0]
    assert _flags(train["args"])["--registry"] == [registry]
    objs = DEPLOYABLE["base"]
    seen = {}
    for kind, name, container in [("StatefulSet", "gateway", "gateway"), ("StatefulSet", "vllm", "vllm"),
                                  ("Deployment", "loop", "loop")]:
        seen[name] = _mount_for(*_container(objs, kind, name, container), registry)
    tpod = _train_job()["spec"]["template"]["spec"]
    seen["train"] = _mount_for(tpod, tpod["containers"][0], registry)
    assert len({(m, v["persistentVolumeClaim"]["claimName"]) for m, v in seen.values()}) == 1, seen
    mount, vol = seen["gateway"]
    claim = _one(objs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # vLLM only reads it; the gateway, the loop and training write (classifier, runs, registrations)
    _, vc = _container(objs, "StatefulSet", "vllm", "vllm")
    assert next(m for m in vc["volumeMounts"] if m["mountPath"] == mount).get("readOnly") is True
    assert set(_users_of(claim["metadata"]["name"], objs)) == {"gateway", "vllm", "loop", "train-code-"}


@pytest.mark.parametrize("which", ["base", "production"])
def test_sqlite_log_store_users_share_one_node_and_one_path(which):
    objs = DEPLOYABLE[which]
    db = CONFIG["logs"]["path"]
    assert CONFIG["loop"]["db"] == db
    assert _flags(_train_job()["spec"]["template"]["spec"]["containers"][0]["args"])["--db"] == [db]
    claims = set()
    for name, (pod, c) in _users_of("specialist-router-logs", objs).items():
        mount, vol = _mount_for(pod, c, db)
        claims.add((mount, vol["persistentVolumeClaim"]["claimName"]))
        assert pod["nodeSelector"].get(LOG_NODE_LABEL) == "true", f"{name} opens SQLite off the log-store node"
    assert len(claims) == 1
    users = set(_users_of("specialist-router-logs", objs))
    assert users == {"gateway", "loop", "train-code-"}
    assert _one(objs, "PersistentVolumeClaim", "specialist-router-logs")["spec"]["accessModes"] == ["ReadWriteOnce"]


# -------------------------------------------------------------------------- config, flags, the CLI itself
def _help(*cmd: str) -> str:
    r = subprocess.run([sys.executable, "-m", "cli", *cmd, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_every_flag_in_the_manifests_is_a_flag_of_its_command():
    _, gw = _container(BASE_OBJS, "StatefulSet", "gateway", "gateway")
    _, loop = _container(BASE_OBJS, "Deployment", "loop", "loop")
    train = _train_job()["spec"]["template"]["spec"]["containers"][0]
    for container, sub in [(gw, "serve"), (loop, "loop"), (train, "train")]:
        assert container["command"] == ["specialist-router"] and container["args"][0] == sub
        text = _help(sub)
        used = _flags(container["args"][1:])
        assert used
        for flag in used:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{sub}: {flag} is not in --help"
    assert not re.search(r"(?<![\w-])--no-such-flag(?![\w-])", _help("serve"))  # the check can fail


def _gateway_args() -> list[str]:
    _, gw = _container(BASE_OBJS, "StatefulSet", "gateway", "gateway")
    return gw["args"]


def _config_file(tmp_path: Path) -> Path:
    cm = _one(BASE_OBJS, "ConfigMap", "specialist-router-config")
    p = tmp_path / "config.yaml"
    p.write_text(cm["data"]["config.yaml"])
    return p


def test_gateway_config_and_flags_load_with_the_gateways_own_loader(tmp_path, monkeypatch):
    import cli
    from core import config as core_config
    from router import config as router_config

    args = _gateway_args()
    path = _config_file(tmp_path)
    ns = cli.build_parser().parse_args(args)               # the real parser: types and choices of every flag
    assert ns.config == f"{CONFIG_MOUNT}/config.yaml"
    overrides = core_config.overrides_from_args(ns)
    # TLS files are checked to exist; they come from the init container (test below): stand-ins here
    for key in ("cert_file", "key_file"):
        (tmp_path / key).write_text("pem")
    overrides["tls"] = {"cert_file": str(tmp_path / "cert_file"), "key_file": str(tmp_path / "key_file")}
    for k in list(os.environ):
        if k.startswith("SPECIALIST_ROUTER__"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SPECIALIST_ROUTER__BACKEND__API_KEY", "from-the-secret")   # the env name the pod sets
    monkeypatch.setenv("SPECIALIST_ROUTER_HOME", str(tmp_path / "home"))           # load() rewrites it: restored
    cfg = router_config.load(path, overrides)
    assert cfg.backend.api_key == "from-the-secret"
    assert cfg.backend.external and cfg.backend.url.startswith("http://vllm-")
    assert cfg.host == "0.0.0.0" and cfg.auth.enabled and cfg.logs.enabled and cfg.http.enabled
    assert cfg.registry == CONFIG["registry"] and cfg.data_dir == "/data"
    pod, gw = _container(BASE_OBJS, "StatefulSet", "gateway", "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"grpc": cfg.port, "http": cfg.http.port}
    assert (gw["readinessProbe"]["httpGet"]["scheme"] == "HTTPS") == bool(CONFIG["tls"]["cert_file"])
    # draining fits in the pod's grace period: preStop sleep + grace_s
    pre = int(gw["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre + cfg.grace_s
    # the same file with a misspelt key is refused: the loader is really checking it
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("max_cpu_loras:", "max_cpu_lora:"))
    from core.errors import ConfigError
    with pytest.raises(ConfigError, match="max_cpu_lora"):
        router_config.load(bad, overrides)


def test_gateway_secrets_reach_the_paths_the_config_names_with_mode_0600():
    pod, gw = _container(BASE_OBJS, "StatefulSet", "gateway", "gateway")
    init = next(c for c in pod["initContainers"] if c["name"] == "secrets")
    script = init["command"][-1]
    copies = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if "install" in words:
            i = words.index("install")
            mode, src, dst = words[i + 2], words[i + 3], words[i + 4]
            assert words[i + 1] == "-m"
            copies[dst] = (mode, src)
    vols = {v["name"]: v for v in pod["volumes"]}
    for dst in (CONFIG["auth"]["tokens_file"], CONFIG["tls"]["cert_file"], CONFIG["tls"]["key_file"]):
        mode, src = copies[dst]
        assert mode == "0600", dst
        # the source is a key of a Secret mounted in the init container
        smount, svol = _mount_for(pod, init, src)
        key = src[len(smount) + 1:]
        secret = next(s for s in SECRETS if s["metadata"]["name"] == svol["secret"]["secretName"])
        assert key in secret["stringData"], (dst, key)
        assert svol["secret"]["defaultMode"] in (0o400, 0o600)
        # the destination is the same memory-backed emptyDir in both containers, read-only for the gateway
        dmount, dvol = _mount_for(pod, init, dst)
        gmount, gvol = _mount_for(pod, gw, dst)
        assert (dmount, dvol) == (gmount, gvol) and dvol["emptyDir"]["medium"] == "Memory"
        assert next(m for m in gw["volumeMounts"] if m["mountPath"] == gmount)["readOnly"] is True
    # the gateway container itself never mounts a Secret volume
    assert not [m for m in gw["volumeMounts"] if "secret" in vols[m["name"]]]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0 and sc["fsGroup"] == sc["runAsGroup"]


def test_secret_templates_are_placeholders_the_gateway_refuses(tmp_path):
    from core.errors import ConfigError
    from router.auth import load_tokens
    from router.config import AuthConfig

    auth = next(s for s in SECRETS if s["metadata"]["name"] == "gateway-auth")
    template = auth["stringData"]["tokens.yaml"]
    f = tmp_path / "tokens.yaml"
    f.write_text(template)
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="32"):
        load_tokens(AuthConfig(enabled=True, tokens_file=str(f)))
    # with real tokens in place of the placeholders the same file is accepted, scopes as written
    real = re.sub(r"REPLACE_ME\w*", lambda m: secrets.token_urlsafe(32), template)
    f.write_text(real)
    tokens = load_tokens(AuthConfig(enabled=True, tokens_file=str(f)))
    assert {t.name: set(t.scopes) for t in tokens} == {"app": {"generate"}, "ops": {"generate", "admin"}}
    f.chmod(0o640)   # what a Secret volume with fsGroup would give: refused, hence the init container's copy
    with pytest.raises(ConfigError, match="readable by other users"):
        load_tokens(AuthConfig(enabled=True, tokens_file=str(f)))
    for s in SECRETS:
        for key, value in s["stringData"].items():
            assert "REPLACE_ME" in value, (s["metadata"]["name"], key)


def test_loop_config_and_its_training_children_load(tmp_path, monkeypatch):
    import cli
    from cli.train import config_from_args
    from loop import config as loop_config

    for k in list(os.environ):
        if k.startswith(("SPECIALIST_ROUTER_LOOP__", "SPECIALIST_ROUTER_TRAIN__")):
            monkeypatch.delenv(k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)   # a GPU container sees its one GPU as cuda:0
    path = _config_file(tmp_path)
    _, loop = _container(BASE_OBJS, "Deployment", "loop", "loop")
    ns = cli.build_parser().parse_args(loop["args"])
    assert ns.config == f"{CONFIG_MOUNT}/config.yaml" and ns.loop_cmd is None     # `loop`: run until stopped
    cfg = loop_config.load(str(path))
    assert cfg.device == "cuda:0" and str(cfg.registry_root()) == CONFIG["registry"]
    assert str(cfg.db_path()) == CONFIG["logs"]["path"]
    # the command loop/controller.py starts for a run, parsed and loaded by `train` itself
    child = ["train", "--task", "code", "--profile", cfg.profile, "--device", cfg.device, "--db", str(cfg.db_path()),
             "--registry", str(cfg.registry_root()), "--until", "1700000000.000000", "--run-dir", str(tmp_path / "r"),
             "--no-progress", "--json", "--no-deploy"]
    for kv in cfg.train_set:
        child += ["--set", kv]
    tcfg = config_from_args(cli.build_parser().parse_args(child))
    assert tcfg.base_model == CONFIG["backend"]["model"] and tcfg.batch_size == 1 and tcfg.device == "cuda:0"
    # and the training Job's own command line
    job = _train_job()["spec"]["template"]["spec"]["containers"][0]
    jcfg = config_from_args(cli.build_parser().parse_args(job["args"]))
    assert (jcfg.task, jcfg.profile, jcfg.device, jcfg.base_model) == ("code", "standard", "cuda:0",
                                                                      CONFIG["backend"]["model"])
    assert not jcfg.deploy


def test_loop_is_a_single_recreated_replica():
    for objs in DEPLOYABLE.values():
        loop = _one(objs, "Deployment", "loop")
        assert loop["spec"]["replicas"] == 1 and loop["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("which", ["base", "production"])
def test_project_pods_run_as_non_root_without_privileges(which):
    for o, pod in _pods(DEPLOYABLE[which]):
        assert pod["automountServiceAccountToken"] is False
        if _name(o) == "vllm":   # the vLLM image runs as root: no privilege escalation is all it gets here
            assert pod["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False}
            continue
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] >= 1000 and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert sc["fsGroup"] == sc["runAsGroup"] and sc["fsGroupChangePolicy"] == "OnRootMismatch"
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_commands_in_the_kubernetes_guide_parse_with_the_cli():
    """Every `kubectl ... -- specialist-router ...` line of docs/kubernetes.md is a valid command line."""
    import cli

    text = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split(" -- specialist-router ", 1)[1] for b in blocks for line in b.splitlines()
             if " -- specialist-router " in line]
    assert len(lines) >= 5
    parser = cli.build_parser()
    for line in lines:
        argv = shlex.split(line, comments=True)
        ns = parser.parse_args(argv)
        if argv[0] == "loop":
            assert ns.config == f"{CONFIG_MOUNT}/config.yaml", line    # the file reaches the subcommand
        if getattr(ns, "gateway", None):
            assert ns.ca_cert == CONFIG["tls"]["cert_file"].rsplit("/", 1)[0] + "/ca.crt", line
