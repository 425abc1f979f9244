"""Lint and render the Helm chart with Helm's own Go SDK (helm-python-sdk, no helm binary).

Runs in the deploy tools' virtual environment (.ci/deploy_checks.sh makes it). For each value
set -- the chart's defaults and every helm/lightningdit/ci/*-values.yaml -- it
  1. lints the chart like `helm lint --strict` (warnings fail, an info such as "icon is
     recommended" is printed only),
  2. validates the values against values.schema.json and renders the templates offline like
     `helm template`,
  3. writes OUT/<set>/manifests.yaml (every object) and one file per object under
     OUT/<set>/k8s/ (built-in kinds, for kubernetes-validate) or OUT/<set>/crd/ (kinds of
     CRDs that kubernetes-validate has no schema for: KEDA, Prometheus Operator).

usage: python .ci/deploy_render.py --chart helm/lightningdit --out DIR
Exit status 1 when any lint or render fails.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import helm_python as helm
import yaml

# Custom resources the chart may render and kubernetes-validate has no schema for.
CRD_API_VERSIONS = {"keda.sh/v1alpha1", "monitoring.coreos.com/v1"}
RELEASE = "ldit"
NAMESPACE = "lightningdit"


def value_sets(chart: Path) -> dict[str, dict | None]:
    sets: dict[str, dict | None] = {"default": None}
    for path in sorted((chart / "ci").glob("*-values.yaml")):
        sets[path.name.removesuffix("-values.yaml")] = yaml.safe_load(path.read_text()) or {}
    return sets


def lint(chart: Path, name: str, values: dict | None) -> bool:
    report = helm.lint(chart, values, strict=True, namespace=NAMESPACE)
    ok = not report.get("errors")
    for msg in report.get("messages") or []:
        level = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}.get(msg["severity"], "?")
        print(f"  helm lint [{name}] {level} {msg['path']}: {msg['error'].strip()}")
        if msg["severity"] >= 2:
            ok = False
    return ok


def render(chart: Path, name: str, values: dict | None, out: Path) -> bool:
    with helm.Chart.load(chart) as loaded:
        try:
            loaded.validate_schema(values)
            manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as exc:
            print(f"  helm template [{name}] failed: {exc}")
            return False
    target = out / name
    for sub in ("k8s", "crd"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    docs = []
    for source in sorted(manifests):
        if source.endswith("NOTES.txt") or not manifests[source].strip():
            continue
        for doc in yaml.safe_load_all(manifests[source]):
            if doc:
                docs.append((source, doc))
    if not docs:
        print(f"  helm template [{name}] rendered no object")
        return False
    for i, (source, doc) in enumerate(docs):
        kind = doc.get("kind", "Unknown")
        meta_name = (doc.get("metadata") or {}).get("name", "unnamed")
        sub = "crd" if doc.get("apiVersion") in CRD_API_VERSIONS else "k8s"
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{i:03d}-{kind}-{meta_name}")
        (target / sub / f"{stem}.yaml").write_text(f"# Source: {source}\n" + yaml.safe_dump(doc, sort_keys=False))
    (target / "manifests.yaml").write_text(yaml.safe_dump_all([d for _, d in docs], sort_keys=False))
    kinds = ", ".join(sorted({d["kind"] for _, d in docs}))
    print(f"  helm template [{name}] {len(docs)} objects: {kinds}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step", choices=["lint", "template", "all"], default="all")
    args = parser.parse_args()
    print(f"  helm SDK {helm.helm_sdk_version()} (helm-c {helm.helm_c_version()}), chart {args.chart}")
    ok = True
    for name, values in value_sets(args.chart).items():
        if args.step in ("lint", "all"):
            ok &= lint(args.chart, name, values)
        if args.step in ("template", "all"):
            ok &= render(args.chart, name, values, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
