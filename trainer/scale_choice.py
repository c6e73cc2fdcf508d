"""``weight_scale`` chosen on both sides: dialect validation chrF against what the adapter
costs the base model elsewhere (``trainer.retention``).

For each candidate scale the curve holds the validation chrF and the retention cost; the
chosen scale is the one with the best validation chrF among those within the limits
(ties go to the scale nearest 1.0). When no scale is within them, nothing is chosen and
the publish gate refuses the adapter. The trainer (end of run) and ``make eval
--choose-scale`` both measure the curve here, through the server's engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.retention import ControlSets, retention
from trainer.rows import Row
from trainer.scoring import EngineGenerator


@dataclass(frozen=True)
class RetentionLimits:
    """What a scale may cost the base model: the control chrF drop (Mandarin and English
    customer-service utterances, what callers routed to the adapter send besides their
    dialect) and each perplexity whose limit is set (None: reported, not binding). By
    default general-prose perplexity binds and in-domain perplexity is reported only
    (see ``TrainConfig.max_domain_perplexity_increase_pct`` for why)."""

    max_control_chrf_drop: float = 2.0
    """chrF points the adapter may cost on either control set (Mandarin, English)."""
    max_domain_perplexity_increase_pct: float | None = None
    """Percent the adapter may raise perplexity on the in-domain dialogue; None: reported,
    not binding."""
    max_general_perplexity_increase_pct: float | None = 10.0
    """Percent it may raise perplexity on general prose; None: reported, not binding."""

    @classmethod
    def from_config(cls, config: TrainConfig) -> RetentionLimits:
        return cls(config.max_control_chrf_drop, config.max_domain_perplexity_increase_pct,
                   config.max_general_perplexity_increase_pct)

    def as_dict(self) -> dict[str, float | None]:
        return {"max_control_chrf_drop": self.max_control_chrf_drop,
                "max_domain_perplexity_increase_pct": self.max_domain_perplexity_increase_pct,
                "max_general_perplexity_increase_pct": self.max_general_perplexity_increase_pct}

    def breaches(self, point: dict[str, float]) -> list[str]:
        """The limits ``point`` (one scale's retention numbers) breaks, each in words. A
        figure that was not measured (no in-domain text) breaks nothing."""
        out = []
        for key, label in (("mandarin_chrf_drop", "Mandarin"), ("english_chrf_drop", "English")):
            if point[key] > self.max_control_chrf_drop:
                out.append(f"{label} control chrF -{point[key]:.1f} "
                           f"(limit {self.max_control_chrf_drop:g})")
        domain, domain_limit = point.get("domain_perplexity_increase_pct"), \
            self.max_domain_perplexity_increase_pct
        if domain is not None and domain_limit is not None and domain > domain_limit:
            out.append(f"in-domain perplexity +{domain:.1f}% (limit {domain_limit:g}%)")
        general = self.max_general_perplexity_increase_pct
        if general is not None and point["perplexity_increase_pct"] > general:
            out.append(f"general perplexity +{point['perplexity_increase_pct']:.1f}% "
                       f"(limit {general:g}%)")
        return out


def choose(curve: dict[str, Any], limits: RetentionLimits) -> tuple[float | None, str]:
    """The best scale of ``curve`` within ``limits`` (None if none is), and why, in words."""
    points = curve["by_scale"]
    allowed = [float(s) for s, p in points.items() if not limits.breaches(p)]
    if not allowed:
        worst = {s: "; ".join(limits.breaches(p)) for s, p in points.items()}
        return None, ("no scale keeps the base model's abilities within the limits: "
                      + ", ".join(f"{s}: {why}" for s, why in worst.items()))
    best = max(allowed, key=lambda s: (points[f"{s:g}"]["val_chrf"], -abs(s - 1.0)))
    dropped = [s for s in points if float(s) not in allowed]
    note = f" (over the limits: {', '.join(dropped)})" if dropped else ""
    return best, (f"scale {best:g}: validation chrF {points[f'{best:g}']['val_chrf']:.2f}, "
                  f"the best within the retention limits{note}")


def scale_curve(generator: EngineGenerator, template: str, adapter: str, val_rows: list[Row],
                sets: ControlSets, scales: list[float], limits: RetentionLimits,
                samples: int | None = None) -> dict[str, Any]:
    """Validation chrF and retention per scale, the base model's, and the choice (one
    engine pass: see ``retention``)."""
    curve = retention(generator, sets, template, adapter, scales, samples=samples,
                      val_rows=val_rows)
    for point in curve["by_scale"].values():
        point["within_limits"] = not limits.breaches(point)
    chosen, reason = choose(curve, limits)
    curve.update(val_rows=len(val_rows), limits=limits.as_dict(), chosen_scale=chosen,
                 choice=reason)
    return curve


def summary_line(curve: dict[str, Any], scale: float) -> str:
    """One progress line: the chrF and the retention cost at ``scale``."""
    point = curve["by_scale"][f"{scale:g}"]
    domain = point.get("domain_perplexity_increase_pct")
    return (f"scale {scale:g}: val chrF {point['val_chrf']:.2f} (base "
            f"{curve['base']['val_chrf']:.2f}); retention: Mandarin chrF "
            f"{-point['mandarin_chrf_drop']:+.1f}, English chrF "
            f"{-point['english_chrf_drop']:+.1f}"
            f"{'' if domain is None else f', in-domain perplexity {domain:+.1f}%'}"
            f", general perplexity {point['perplexity_increase_pct']:+.1f}%"
            f"{'' if point['within_limits'] else ' (over the limits)'}")


def plot_scale_curve(path: Path, curve: dict[str, Any], title: str) -> None:
    """``scale.png``: validation chrF and the retention costs against the scale, the
    limits drawn in, the chosen scale marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    scales = sorted(float(s) for s in curve["by_scale"])
    points = [curve["by_scale"][f"{s:g}"] for s in scales]
    limits = curve["limits"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(scales, [p["val_chrf"] for p in points], marker="o", label="adapter")
    top.axhline(curve["base"]["val_chrf"], color="grey", linestyle=":", label="base model")
    top.set_ylabel("dialect validation chrF")
    top.legend()
    bottom.plot(scales, [p["mandarin_chrf_drop"] for p in points], marker="o",
                label="Mandarin control chrF drop (points)")
    bottom.plot(scales, [p["english_chrf_drop"] for p in points], marker="s",
                label="English control chrF drop (points)")
    if all("domain_perplexity_increase_pct" in p for p in points):
        domain = limits.get("max_domain_perplexity_increase_pct")
        bottom.plot(scales, [p["domain_perplexity_increase_pct"] for p in points], marker="^",
                    color="C2", linestyle=":" if domain is None else "-",
                    label="in-domain perplexity increase (%)"
                          + (" (reported, not binding)" if domain is None else ""))
        if domain is not None:
            bottom.axhline(domain, color="C2", linestyle="--", linewidth=0.8)
    general = limits.get("max_general_perplexity_increase_pct")
    bottom.plot(scales, [p["perplexity_increase_pct"] for p in points], marker="v",
                color="C3", linestyle=":" if general is None else "-",
                label="general-prose perplexity increase (%)"
                      + (" (reported, not binding)" if general is None else ""))
    bottom.axhline(limits["max_control_chrf_drop"], color="C0", linestyle="--", linewidth=0.8)
    if general is not None:
        bottom.axhline(general, color="C3", linestyle="--", linewidth=0.8)
    bottom.set_xlabel("weight_scale")
    bottom.set_ylabel("cost to the base (limits dashed)")
    bottom.legend(fontsize=8)
    if curve.get("chosen_scale") is not None:
        for axes in (top, bottom):
            axes.axvline(curve["chosen_scale"], color="black", linewidth=0.8)
    top.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
