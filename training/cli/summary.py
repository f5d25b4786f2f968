"""What `aewatch train` prints when it is done: the run's figures, in a few plain lines."""

from __future__ import annotations

__all__ = ["describe"]


def describe(summary: dict, tracking_uri: str, name: str | None) -> str:
    """The training summary as text: losses, steps, threshold, false alarms, test figures,
    convergence, the PCA baseline's verdict and where the run and artifact are."""

    def num(x):
        return "n/a" if x is None else f"{x:.5g}"

    cycles = summary.get("cycles", 1)
    went_on = f" ({cycles} cycles of its plan: it had not converged)" if cycles > 1 else ""
    kept = summary.get("kept_val_loss")
    if kept is not None and kept != summary["val_loss"]:
        kept = f" (the weights kept: {num(kept)}, step {summary['best_step']})"
    else:
        kept = ""
    lines = [
        f"trained {summary['model_kind']} ({summary['backbone']}) in {summary['epochs']} epochs, "
        f"{summary['steps']} steps{went_on}: train loss {num(summary['train_loss'])}, "
        f"validation loss {num(summary['val_loss'])}{kept}",
        f"threshold {num(summary['threshold'])} ({summary['calibration']})",
    ]
    fpr = summary.get("fpr_estimate")
    if fpr:
        lines.append(
            f"false-positive rate on held-out normal windows: {fpr['rate']:.4f} "
            f"(95% CI {fpr['ci_low']:.4f}-{fpr['ci_high']:.4f}, n={fpr['n']})"
        )
    check = summary.get("fpr_check")
    if check and check["far_above"]:
        lines.append(
            f"WARNING: that rate is far above the target {check['target']:g} (95% lower bound "
            f"{check['low']:.4f} on {check['n_eff']} independent windows): expect many more "
            "alarms than asked for; `aewatch promote` refuses this version"
        )
    evaluation = summary.get("evaluation")
    if evaluation and evaluation.get("auroc") is not None:
        lines.append(
            f"test AUROC {evaluation['auroc']:.4f}, AUPRC {evaluation['auprc']:.4f}, "
            f"F1 {evaluation['f1']:.4f}"
        )
    if summary.get("converged") is False:
        lines.append(
            f"not converged after {summary['steps']} steps: give it more (--min-steps, --epochs)"
        )
    if summary.get("baseline"):
        lines.append(summary["baseline"]["verdict"])
    lines.append(f"artifact: {summary['artifact']}")
    lines.append(f"MLflow run: {summary['run_id']} ({tracking_uri})")
    if name:
        lines.append(
            f"registered: models:/{name}/{summary['registered_version']} (alias @challenger)"
        )
    return "\n".join(lines)
