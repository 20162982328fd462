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
K8S_VERSIONS = ("1.30", "1.33")  # the oldest supported and a recent one
CONFIG_MOUNT = "/etc/specialist-router"
TRAINING_NODE_LABEL = "specialist-router.io/training"    # nodes whose GPUs the loop and training Jobs use
PG_SECRET = "postgres"                                  # the log store's URL (key url) and password (key password)
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
    bad = copy.deepcopy(_one(BASE_OBJS, "Deployment", "gateway"))
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
                ("PersistentVolumeClaim", "models"),
                ("StatefulSet", "vllm"), ("Service", "vllm"), ("Deployment", "gateway"), ("Service", "gateway"),
                ("PodDisruptionBudget", "gateway"), ("PodDisruptionBudget", "vllm"),
                ("Deployment", "loop")]:
        assert ref in kinds, ref
    assert ("StatefulSet", "gateway") not in kinds                      # gateways are not paired to vLLM pods
    assert ("PersistentVolumeClaim", "specialist-router-logs") not in kinds   # the logs are in PostgreSQL
    assert {(s["kind"], s["metadata"]["name"]) for s in SECRETS} == {
        ("Secret", "gateway-auth"), ("Secret", "gateway-tls"), ("Secret", "vllm-api-key"), ("Secret", PG_SECRET)}
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
    # one budget per serving workload (gateways and vLLM replicas are independent): each selects exactly its own
    for name in ("gateway", "vllm"):
        pdb = _one(objs, "PodDisruptionBudget", name)
        covered = {_name(o) for o, _ in _pods(objs)
                   if pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(o).items()}
        assert covered == {name}, (name, covered)
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
    gw = _one(objs, "Deployment", "gateway")["spec"]["template"]
    assert gw["metadata"]["annotations"]["prometheus.io/scheme"] == ("https" if CONFIG["tls"]["cert_file"] else "http")


# ------------------------------------------------------------------------ gateways over every vLLM replica
def _rendered_config(objs: list[dict]) -> dict:
    return yaml.safe_load(_one(objs, "ConfigMap", "specialist-router-config")["data"]["config.yaml"])


@pytest.mark.parametrize("which", ["base", "production"])
def test_gateway_config_lists_exactly_the_vllm_replicas_by_their_stable_names(which):
    """backend.urls = vllm-0 .. vllm-(replicas-1) under the headless Service, at the port that reaches vLLM."""
    objs = DEPLOYABLE[which]
    vllm = _one(objs, "StatefulSet", "vllm")
    svc = _one(objs, "Service", vllm["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"          # per-pod DNS names, no load balancing across replicas
    _, vc = _container(objs, "StatefulSet", "vllm", "vllm")
    cports = {p["name"]: p["containerPort"] for p in vc["ports"]}
    port = int(_flags(vc["args"])["--port"][0])        # a pod DNS name is the pod's IP: the container port counts
    assert port in cports.values()
    assert [p["port"] for p in svc["spec"]["ports"] if cports.get(p["targetPort"], p["targetPort"]) == port] == [port]
    n = vllm["spec"]["replicas"]
    assert n >= 2
    backend = _rendered_config(objs)["backend"]
    assert backend["urls"] == [f"http://vllm-{i}.{svc['metadata']['name']}:{port}" for i in range(n)]
    assert "url" not in backend                         # one list, not a single backend
    assert backend["mode"] == "external"                # never a managed vLLM in a GPU-less gateway pod
    # several gateways share the replicas: no gateway-side eviction, vLLM's own CPU cache pages adapters
    assert backend["adapter_slots"] == 0 and backend.get("balance", "affinity") == "affinity"
    # the gateway's command line names no backend: the config lists them all, the same for every pod
    _, gw = _container(objs, "Deployment", "gateway", "gateway")
    assert "--backend-url" not in _flags(gw["args"]) and not re.search(r"\$\(\w+\)", " ".join(gw["args"]))


@pytest.mark.parametrize("which", ["base", "production"])
def test_gateways_are_a_deployment_scaled_on_their_own_and_spread_over_nodes(which):
    objs = DEPLOYABLE[which]
    gw = _one(objs, "Deployment", "gateway")
    assert gw["spec"]["replicas"] >= 2
    assert gw["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0   # a roll never lowers serving capacity
    pod = gw["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod          # any node; no GPU, no log-store node
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= _pod_labels(gw).items()
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "POD_INDEX" not in env
    # the overlay scales gateways without touching vLLM (the vLLM count stays next to backend.urls in the base)
    k = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert {r["name"] for r in k.get("replicas", [])} == {"gateway"}


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
    # the gateway sends its deploy smoke tests with a priority only to a vLLM that schedules by priority
    assert b["priority"] == "on" and f["--scheduling-policy"] == ["priority"]
    env = {e["name"]: e for e in vc["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "api-key"}
    _, gw = _container(BASE_OBJS, "Deployment", "gateway", "gateway")
    genv = {e["name"]: e for e in gw["env"]}
    assert genv["SPECIALIST_ROUTER__BACKEND__API_KEY"]["valueFrom"] == env["VLLM_API_KEY"]["valueFrom"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vc[probe]["httpGet"]["path"] == "/health"
    # the model folder is on the same volume at the same path for vLLM and the gateway
    assert _mount_for(pod, vc, model) == _mount_for(*_container(BASE_OBJS, "Deployment", "gateway", "gateway"), model)


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
    assert {"key": TRAINING_NODE_LABEL, "operator": "DoesNotExist"} in terms[0]["matchExpressions"]  # kept free
    for o, pod in _pods(objs):
        if _name(o) in ("loop", "train-code-"):
            assert pod["nodeSelector"][TRAINING_NODE_LABEL] == "true", _name(o)
    # the SQLite-era pinning of every log user to one node is gone
    assert "specialist-router.io/log-store" not in yaml.safe_dump(objs)


def test_production_overlay_patches_images_replicas_gpu_nodes_and_storage():
    images = {c["image"] for _, p in _pods(PROD_OBJS) for c in p["containers"] + p.get("initContainers", [])}
    assert images == {"registry.example.com/ml/specialist-router:0.1.0", "vllm/vllm-openai:v0.32.0"}
    assert _one(PROD_OBJS, "Deployment", "gateway")["spec"]["replicas"] == 3
    vsel = _one(PROD_OBJS, "StatefulSet", "vllm")["spec"]["template"]["spec"]["nodeSelector"]
    assert vsel["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3" and vsel["nvidia.com/gpu.present"] == "true"
    lsel = _one(PROD_OBJS, "Deployment", "loop")["spec"]["template"]["spec"]["nodeSelector"]
    assert lsel == {TRAINING_NODE_LABEL: "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
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
    for kind, name, container in [("Deployment", "gateway", "gateway"), ("StatefulSet", "vllm", "vllm"),
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


def _secret_value(name: str, key: str) -> str:
    s = next(s for s in SECRETS if s["metadata"]["name"] == name)
    return s["stringData"][key]


def _pod_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet gives it, Secrets read from the templates."""
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = _secret_value(ref["name"], ref["key"])
    return out


# the process that reads or writes the logs -> the variable that gives it the store (its own config's key)
LOG_USERS = {"gateway": "SPECIALIST_ROUTER__LOGS__URL", "loop": "SPECIALIST_ROUTER_LOOP__DB",
             "train-code-": "SPECIALIST_ROUTER_TRAIN__DB"}


@pytest.mark.parametrize("which", ["base", "production"])
def test_logs_are_in_postgresql_given_by_the_secret(which):
    """Every log user gets the same postgresql:// URL and PGPASSWORD from the Secret; no log volume is left."""
    from convlog.store import is_store_url

    objs = DEPLOYABLE[which]
    seen = set()
    for o, pod in _pods(objs):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if _name(o) in LOG_USERS:
                seen.add(_name(o))
                assert env[LOG_USERS[_name(o)]]["valueFrom"]["secretKeyRef"] == {"name": PG_SECRET, "key": "url"}
                assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": PG_SECRET, "key": "password"}
                assert "--db" not in _flags(c.get("args", []))        # the URL comes from the environment
            else:
                assert "PGPASSWORD" not in env and not set(env) & set(LOG_USERS.values()), _name(o)
            assert not any(m["mountPath"] == "/logs" for m in c.get("volumeMounts", [])), _name(o)
    assert seen == set(LOG_USERS)
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim" and "logs" in o["metadata"]["name"]]
    cfg = _rendered_config(objs)
    # url and path exclude each other (router/server.py); the SQLite-era keys are gone from the file
    assert "path" not in cfg["logs"] and "url" not in cfg["logs"] and "db" not in cfg["loop"]
    url = _secret_value(PG_SECRET, "url")
    assert is_store_url(url) and url.startswith("postgresql://")


def test_no_password_in_any_manifest_command_line_or_config():
    """Passwords reach processes only as PGPASSWORD from a Secret: never argv, a literal env value or the
    ConfigMap; and the URL the Secret holds has none either (it ends up on the loop's training command lines)."""
    from convlog.postgres_store import _Url, redact

    with_password = re.compile(r"postgres(?:ql)?://[^/@\s]*:[^/@\s]*@|[?&]password=", re.I)
    objs = BASE_OBJS + PROD_OBJS + JOBS
    for o, pod in _pods(objs):
        for c in pod["containers"] + pod.get("initContainers", []):
            argv = " ".join(c.get("command", []) + c.get("args", []))
            assert not with_password.search(argv) and "PGPASSWORD" not in argv, (_name(o), c["name"])
            for e in c.get("env", []):
                if "value" in e:
                    assert not with_password.search(e["value"]) and "postgres" not in e["value"], e["name"]
                    assert "PASSWORD" not in e["name"].upper(), e["name"]       # a password is never a literal
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        for text in cm["data"].values():
            assert not with_password.search(text) and not re.search(r"^\s*password\s*:", text, re.M)
    url = _secret_value(PG_SECRET, "url")
    assert urlsplit(url).password is None and redact(url) == url
    assert _Url(url).password == ""                     # as the store parses it: libpq gets it from PGPASSWORD
    # the check above can fail: a URL with a password is caught
    assert with_password.search("--db=postgresql://router:s3cret@db:5432/logs")


# -------------------------------------------------------------------------- config, flags, the CLI itself
def _help(*cmd: str) -> str:
    r = subprocess.run([sys.executable, "-m", "cli", *cmd, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_every_flag_in_the_manifests_is_a_flag_of_its_command():
    _, gw = _container(BASE_OBJS, "Deployment", "gateway", "gateway")
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
    _, gw = _container(BASE_OBJS, "Deployment", "gateway", "gateway")
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
    _, gw = _container(BASE_OBJS, "Deployment", "gateway", "gateway")
    env = _pod_env(gw)                                 # what the pod sets, Secret values from the templates
    for k, v in env.items():
        if k.startswith("SPECIALIST_ROUTER__") or k == "PGPASSWORD":
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("SPECIALIST_ROUTER_HOME", str(tmp_path / "home"))           # load() rewrites it: restored
    cfg = router_config.load(path, overrides)
    assert cfg.backend.api_key == _secret_value("vllm-api-key", "api-key")
    assert cfg.backend.external and not cfg.backend.url
    assert list(cfg.backend.urls) == CONFIG["backend"]["urls"] and cfg.backend.adapter_slots == 0
    assert cfg.logs.url == _secret_value(PG_SECRET, "url") and not cfg.logs.path   # PostgreSQL, not SQLite
    assert cfg.host == "0.0.0.0" and cfg.auth.enabled and cfg.logs.enabled and cfg.http.enabled
    assert cfg.registry == CONFIG["registry"] and cfg.data_dir == "/data"
    pod, gw = _container(BASE_OBJS, "Deployment", "gateway", "gateway")
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
    pod, gw = _container(BASE_OBJS, "Deployment", "gateway", "gateway")
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
    url = _secret_value(PG_SECRET, "url")
    path = _config_file(tmp_path)
    _, loop = _container(BASE_OBJS, "Deployment", "loop", "loop")
    ns = cli.build_parser().parse_args(loop["args"])
    assert ns.config == f"{CONFIG_MOUNT}/config.yaml" and ns.loop_cmd is None     # `loop`: run until stopped
    monkeypatch.setenv("SPECIALIST_ROUTER_LOOP__DB", _pod_env(loop)["SPECIALIST_ROUTER_LOOP__DB"])
    cfg = loop_config.load(str(path))
    assert cfg.device == "cuda:0" and str(cfg.registry_root()) == CONFIG["registry"]
    assert cfg.db_path() == url and cfg.db_exists()     # the gateways' store, as a URL (no file to wait for)
    # the command loop/controller.py starts for a run, parsed and loaded by `train` itself
    child = ["train", "--task", "code", "--profile", cfg.profile, "--device", cfg.device, "--db", str(cfg.db_path()),
             "--registry", str(cfg.registry_root()), "--until", "1700000000.000000", "--run-dir", str(tmp_path / "r"),
             "--no-progress", "--json", "--no-deploy"]
    for kv in cfg.train_set:
        child += ["--set", kv]
    tcfg = config_from_args(cli.build_parser().parse_args(child))
    assert tcfg.base_model == CONFIG["backend"]["model"] and tcfg.batch_size == 1 and tcfg.device == "cuda:0"
    assert tcfg.db == url
    # and the training Job's own command line, with the environment its pod gets
    job = _train_job()["spec"]["template"]["spec"]["containers"][0]
    monkeypatch.setenv("SPECIALIST_ROUTER_TRAIN__DB", _pod_env(job)["SPECIALIST_ROUTER_TRAIN__DB"])
    jcfg = config_from_args(cli.build_parser().parse_args(job["args"]))
    assert (jcfg.task, jcfg.profile, jcfg.device, jcfg.base_model) == ("code", "standard", "cuda:0",
                                                                      CONFIG["backend"]["model"])
    assert jcfg.db == url and not jcfg.deploy


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
    # `exec deploy/X -- sh -c 'specialist-router ... "$VAR"'`: VAR is expanded in the pod, from X's environment
    for b in blocks:
        for line in b.splitlines():
            if " -- sh -c " in line:
                target = re.search(r"exec deploy/([\w-]+)", line).group(1)
                script = shlex.split(line.split(" -- ", 1)[1], comments=True)[2]
                assert script.startswith("specialist-router "), line
                env = _pod_env(_container(BASE_OBJS, "Deployment", target, target)[1])
                for var in re.findall(r"\$\{?(\w+)", script):
                    assert var in env, f"{line}: {var} is not set in {target}"
                lines.append(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], script)[len("specialist-router "):])
    assert len(lines) >= 5
    parser = cli.build_parser()
    for line in lines:
        argv = shlex.split(line, comments=True)
        ns = parser.parse_args(argv)
        if argv[0] == "loop":
            assert ns.config == f"{CONFIG_MOUNT}/config.yaml", line    # the file reaches the subcommand
        if getattr(ns, "gateway", None):
            assert ns.ca_cert == CONFIG["tls"]["cert_file"].rsplit("/", 1)[0] + "/ca.crt", line
