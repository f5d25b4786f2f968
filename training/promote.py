"""Promotion: compare the challenger with the champion and move the `champion` alias only when the
gates pass; roll back to the previous champion.

Gates (each recorded with its figures as tags on both versions):
- false alarms: the challenger's false-positive rate on normal windows is not far above its
  target: the exact 95% lower bound on its effectively independent windows is at most the target
  (`training.fpr_check`); `allow_high_fpr` lets a version through anyway, recorded as a tag;
- ranking: with labelled data and an existing champion, the challenger's AUROC is no worse than the
  champion's beyond `tolerance`;
- PCA baseline (on by default, `pca_gate`): when the challenger's training run had a labelled test
  split, its test AUROC there is at least that of the PCA baseline fitted on the same windows
  (`training.baseline`); both figures are the ones recorded at training, on the same split.
With `data`, both are scored on the same windows; without, the figures recorded at training are
used. The alias history lives in the registered model tag `aewatch.champion_history`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline.detector import Detector
from pipeline.detector.threshold import anomalous
from pipeline.errors import ConfigError, RegistryError
from pipeline.registry.client import TAG_PREFIX, load_model
from training.calibrate import estimate_fpr
from training.data.for_detector import ALL, DataSource, load_for
from training.evaluate import decision_metrics, ranking_metrics
from training.fpr_check import FprCheck, check_fpr, window_of
from training.register import CHALLENGER, CHAMPION
from training.tracking import Registry

__all__ = [
    "Gate",
    "PromoteSettings",
    "PromotionReport",
    "apply_promotion",
    "compare",
    "promote",
    "rollback",
]

log = logging.getLogger(__name__)
HISTORY_TAG = TAG_PREFIX + "champion_history"


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str
    overridden: bool = False  # failed, but let through on request


@dataclass
class PromotionReport:
    name: str
    challenger: str
    champion: str | None
    figures: dict[str, dict] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def table(self) -> str:
        roles = [r for r in ("champion", "challenger") if r in self.figures]
        keys = sorted({k for r in roles for k in self.figures[r]})
        width = max(len(k) for k in keys) + 2
        header = "".ljust(width) + "".join(
            f"{r} v{self.champion if r == 'champion' else self.challenger}".rjust(22) for r in roles
        )
        lines = [header]
        for key in keys:
            cells = "".join(_fmt(self.figures[r].get(key)).rjust(22) for r in roles)
            lines.append(key.ljust(width) + cells)
        lines.append("")
        for gate in self.gates:
            lines.append(f"[{'pass' if gate.passed else 'FAIL'}] {gate.name}: {gate.detail}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "challenger": self.challenger,
            "champion": self.champion,
            "figures": self.figures,
            "gates": [g.__dict__ for g in self.gates],
            "passed": self.passed,
        }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _scored_figures(detector: Detector, data) -> dict:
    scored = data.split_scores(detector, ALL)
    scores, normal = scored.scores, scored.normal
    threshold = detector.threshold.require()
    fpr = estimate_fpr(scores[normal], threshold) if normal.any() else None
    check = _check(detector, fpr.false_positives, fpr.n) if fpr else None
    figures = {
        "threshold": threshold,
        "target_fpr": detector.threshold.params.get("target_fpr"),
        "windows": int(len(scores)),
        "false_alarms": fpr.false_positives if fpr else None,
        "fpr": fpr.rate if fpr else None,
        "fpr_ci_low": fpr.ci_low if fpr else None,
        "fpr_ci_high": fpr.ci_high if fpr else None,
        "fpr_effective_low": check.low if check else None,
        "fpr_effective_n": check.n_eff if check else None,
    }
    labels = scored.labels
    if labels is not None:
        labels = labels.astype(bool)
        figures.update(ranking_metrics(labels, scores))
        figures["f1"] = decision_metrics(labels, anomalous(scores, threshold))["f1"]
    return figures


def _recorded_figures(detector: Detector, tags: dict) -> dict:
    fpr = (
        json.loads(tags[TAG_PREFIX + "fpr_estimate"])
        if TAG_PREFIX + "fpr_estimate" in tags
        else None
    )
    auroc = tags.get(TAG_PREFIX + "test_auroc")
    check = _check(detector, fpr["false_positives"], fpr["n"]) if fpr else None
    return {
        "threshold": detector.threshold.value,
        "target_fpr": detector.threshold.params.get("target_fpr"),
        "fpr": fpr["rate"] if fpr else None,
        "fpr_ci_low": fpr["ci_low"] if fpr else None,
        "fpr_ci_high": fpr["ci_high"] if fpr else None,
        "fpr_effective_low": check.low if check else None,
        "fpr_effective_n": check.n_eff if check else None,
        "auroc": float(auroc) if auroc else None,
    }


def _check(detector: Detector, false_positives: int, n: int) -> FprCheck:
    """The n_eff rule at the version's target (or 1 when it records none: judged in `_gates`)."""
    target = detector.threshold.params.get("target_fpr") or 1.0
    return check_fpr(int(false_positives), int(n), float(target), *window_of(detector))


def _baseline_figures(tags: dict) -> dict:
    """The challenger's and its PCA baseline's test AUROC, as recorded at training."""
    recorded = {
        "trained_auroc": tags.get(TAG_PREFIX + "test_auroc"),
        "pca_auroc": tags.get(TAG_PREFIX + "pca_test_auroc"),
    }
    return {k: float(v) for k, v in recorded.items() if v}


def compare(
    name: str,
    *,
    tracking_uri: str | None,
    load_data=None,
    tolerance: float = 0.01,
    max_fpr: float = 0.01,
    allow_high_fpr: bool = False,
    pca_gate: bool = True,
) -> PromotionReport:
    """Score champion and challenger (`load_data(detector)` gives each its windows) and judge
    the gates. Nothing is changed in the registry."""
    registry = Registry(tracking_uri)
    versions = {
        role: registry.version(name, alias)
        for role, alias in (("challenger", CHALLENGER), ("champion", CHAMPION))
    }
    challenger, champion = versions["challenger"], versions["champion"]
    if challenger is None:
        raise RegistryError(f"{name} has no @{CHALLENGER} version to promote")
    if champion is not None and str(challenger.version) == str(champion.version):
        raise RegistryError(
            f"{name}: @{CHALLENGER} is v{challenger.version}, already @{CHAMPION}: nothing to "
            "promote"
        )
    rolled_back = (challenger.tags or {}).get(TAG_PREFIX + "rolled_back")
    if rolled_back:
        raise RegistryError(
            f"{name}: @{CHALLENGER} v{challenger.version} was rolled back from @{CHAMPION} at "
            f"{rolled_back}; point @{CHALLENGER} at another version, or remove the version's "
            f"{TAG_PREFIX}rolled_back tag to promote it again"
        )
    report = PromotionReport(
        name,
        str(versions["challenger"].version),
        str(versions["champion"].version) if versions["champion"] else None,
    )
    for role, mv in versions.items():
        if mv is None:
            continue
        detector, _ = load_model(f"models:/{name}/{mv.version}", tracking_uri=tracking_uri)
        if load_data is not None:
            report.figures[role] = _scored_figures(detector, load_data(detector))
        else:
            report.figures[role] = _recorded_figures(detector, mv.tags or {})
        if role == "challenger" and detector.config.kind != "pca":
            report.figures[role].update(_baseline_figures(mv.tags or {}))
    report.gates = _gates(report, tolerance, max_fpr, allow_high_fpr)
    if pca_gate:
        report.gates.extend(_pca_gate(report.figures["challenger"]))
    return report


def _pca_gate(challenger: dict) -> list[Gate]:
    """Refuse a challenger that ranked its own test split worse than PCA did (no gate when
    the training run had no labelled test split, or the challenger is PCA)."""
    ours, pca = challenger.get("trained_auroc"), challenger.get("pca_auroc")
    if ours is None or pca is None:
        return []
    detail = f"test AUROC at training {ours:.4f} vs its PCA baseline {pca:.4f}"
    if ours < pca:
        detail += ": PCA on the same windows ranks anomalies better (--no-pca-gate to allow)"
    return [Gate("PCA baseline", ours >= pca, detail)]


def _gates(
    report: PromotionReport, tolerance: float, max_fpr: float, allow_high_fpr: bool = False
) -> list[Gate]:
    challenger = report.figures["challenger"]
    target = challenger.get("target_fpr") or max_fpr
    target = float(target)
    gates = []
    low = challenger.get("fpr_effective_low")
    if low is None:
        gates.append(Gate("false alarms", False, "no false-positive measurement to judge"))
    else:
        detail = (
            f"FPR {challenger['fpr']:.4f} (95% lower bound {low:.4f} on "
            f"{challenger['fpr_effective_n']} independent windows) vs target {target:g}"
        )
        far = low > target
        if far and allow_high_fpr:
            detail += "; far above, let through by --allow-high-fpr"
        overridden = far and allow_high_fpr
        gates.append(Gate("false alarms", not far or overridden, detail, overridden))
    champion = report.figures.get("champion")
    if champion and champion.get("auroc") is not None and challenger.get("auroc") is not None:
        ok = challenger["auroc"] >= champion["auroc"] - tolerance
        gates.append(
            Gate(
                "AUROC",
                ok,
                f"{challenger['auroc']:.4f} vs champion {champion['auroc']:.4f} "
                f"(tolerance {tolerance:g})",
            )
        )
    return gates


def _history(registry: Registry, name: str) -> list[str]:
    return json.loads(registry.model_tags(name).get(HISTORY_TAG, "[]"))


def apply_promotion(report: PromotionReport, *, tracking_uri: str | None) -> bool:
    """Record the decision on both versions and move `champion` if every gate passed."""
    registry = Registry(tracking_uri)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    decision = "promoted" if report.passed else "rejected"
    payload = json.dumps(report.to_dict(), default=str)
    for version in filter(None, (report.challenger, report.champion)):
        registry.set_version_tag(
            report.name, version, TAG_PREFIX + "promotion_decision", f"{decision} {stamp}"
        )
        registry.set_version_tag(
            report.name, version, TAG_PREFIX + "promotion_report", payload[:5000]
        )
    if not report.passed:
        return False
    allowed = [g for g in report.gates if g.overridden]
    if allowed:
        registry.set_version_tag(
            report.name, report.challenger, TAG_PREFIX + "allow_high_fpr", allowed[0].detail
        )
    history = _history(registry, report.name)
    if report.champion and (not history or history[-1] != report.champion):
        history.append(report.champion)
    history.append(report.challenger)
    registry.set_alias(report.name, CHAMPION, report.challenger)
    registry.set_model_tag(report.name, HISTORY_TAG, json.dumps(history[-50:]))
    log.info("%s: champion is now version %s", report.name, report.challenger)
    return True


def rollback(name: str, *, tracking_uri: str | None, dry_run: bool = False) -> tuple[str, str]:
    """Move `champion` back to the version that held it before (with `dry_run`, only say
    which); returns (from, to)."""
    registry = Registry(tracking_uri)
    history = _history(registry, name)
    champion = registry.version(name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name} has no @{CHAMPION} to roll back")
    current = str(champion.version)
    while history and history[-1] == current:
        history.pop()
    if not history:
        raise RegistryError(f"{name}: no previous champion to roll back to")
    previous = history[-1]
    if dry_run:
        return current, previous
    registry.set_alias(name, CHAMPION, previous)
    registry.set_model_tag(name, HISTORY_TAG, json.dumps(history))
    registry.set_version_tag(
        name, current, TAG_PREFIX + "rolled_back", datetime.now(UTC).isoformat(timespec="seconds")
    )
    return current, previous


@dataclass(frozen=True)
class PromoteSettings:
    name: str
    tracking_uri: str | None
    data: DataSource | None = None  # score both versions on it, else use recorded figures
    tolerance: float = 0.01  # allowed AUROC loss against the champion
    max_fpr: float = 0.01  # FPR target when a version records none
    dry_run: bool = False
    allow_high_fpr: bool = False  # promote even when the FPR is far above target (tagged)
    pca_gate: bool = True  # the challenger must beat its PCA baseline (when labels were there)

    def __post_init__(self) -> None:
        """Gates that can be passed, checked before the registry is asked anything."""
        if not 0 <= self.tolerance < 1:
            raise ConfigError("tolerance", f"an AUROC loss in [0, 1), got {self.tolerance}")
        if not 0 < self.max_fpr < 1:
            raise ConfigError("max_fpr", f"a false-positive rate in (0, 1), got {self.max_fpr}")


def promote(settings: PromoteSettings) -> tuple[PromotionReport, bool]:
    """Compare and, unless a dry run, move the champion alias if the gates pass."""
    source = settings.data
    load_data = (lambda detector: load_for(detector, source)) if source else None
    report = compare(
        settings.name,
        tracking_uri=settings.tracking_uri,
        load_data=load_data,
        tolerance=settings.tolerance,
        max_fpr=settings.max_fpr,
        allow_high_fpr=settings.allow_high_fpr,
        pca_gate=settings.pca_gate,
    )
    if settings.dry_run:
        return report, False
    return report, apply_promotion(report, tracking_uri=settings.tracking_uri)
