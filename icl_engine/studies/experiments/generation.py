"""Experiment `generation`: does the LM's in-context next-token distribution approach the
target at the rate of the text-generation bound, N = O(m V / eps^2 log(m / delta))?

Setup: m contexts ("context 3 ->"), each with a target distribution over V' single-token words
(Dirichlet draws). The LM sees N sampled demonstrations "context c -> word" and is asked
"context c ->"; its next-token distribution, renormalised over the V' words, is compared with
the target in total variation (max and mean over contexts); the probability it puts outside
the V' words is reported too. The counting estimator (empirical frequencies of the same N
samples) is the reference curve with a known rate, TV ∝ sqrt(V' m / N): it checks that the
measurement and fit can see a -1/2 slope at all. Predicted: log-log slope -1/2, and
TV * sqrt(N / V') flat across V'.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...core.prompt import start_ids
from ...core.score import compute_prefix, next_token_logprobs
from ..bounds import PREDICTED_SLOPE, Bound, format_theory_table, scaling_check, theory_table
from ..report import finish, lm_info, machine_info, progress
from .common import (
    ExperimentError,
    curve,
    encode,
    fits_table,
    plot_curves,
    plot_scaling,
    points_table,
    run_line,
    verdict_counts,
    verdict_line,
)

__all__ = ["GenerationConfig", "run_generation", "plot_generation", "output_tokens", "counting_tv"]

# Concrete nouns: readable single-token outputs in most BPE vocabularies (checked per tokenizer).
_WORDS = """cat dog fish bird tree car book cup hat sun moon star rain snow milk bread egg rice salt gold
iron wood stone sand road door wall room bed box key pen map ship boat train bus king queen boy girl man
horse cow pig duck lion bear wolf fox frog bee rose lake sea hill farm city town park bank shop desk lamp
coin ring bell drum song game ball cake tea wine soup meat corn apple lemon river house chair table glass
phone clock shoe coat shirt bag card film ice fire wind cloud leaf grass seed flower paper plate spoon
knife bottle garden window kitchen school doctor teacher church bridge island forest mountain""".split()


@dataclass
class GenerationConfig:
    vocab_sizes: tuple[int, ...] = (4, 16, 64)  # V': size of the restricted output set
    m: int = 4  # contexts
    n_grid: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    draws: int = 20
    concentration: float = 1.0  # Dirichlet parameter of the target distributions
    batch_size: int = 8
    n_boot: int = 2000

    def __post_init__(self):
        self.vocab_sizes, self.n_grid = tuple(self.vocab_sizes), tuple(sorted(set(self.n_grid)))
        if not self.vocab_sizes or min(self.vocab_sizes) < 2:
            raise ExperimentError(f"vocab_sizes must be >= 2, got {self.vocab_sizes}")
        if not self.n_grid or self.n_grid[0] < 1:
            raise ExperimentError(f"n_grid must be positive integers, got {self.n_grid}")
        for name in ("m", "draws", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.concentration <= 0:
            raise ExperimentError(f"concentration must be positive, got {self.concentration}")

    @classmethod
    def preset(cls, quick: bool) -> "GenerationConfig":
        # quick: 25k LM tokens in 300 forward calls (SmolLM2-135M: 5.5 min measured on a shared,
        # loaded 2-core machine; small calls are bound by reading the weights); full: 375k tokens.
        return cls(n_grid=(8, 16, 32, 64, 128), draws=10) if quick else cls()


def output_tokens(tokenizer, count: int) -> list[tuple[str, int]]:
    """At least `count` (text, token id) outputs that are ONE token each, so the next-token
    distribution covers the whole answer: curated nouns " cat" first, then any alphanumeric
    token of the vocabulary (with or without a leading space) in id order; tiny test
    tokenizers have few whole words."""
    found, seen = [], set()

    def add(text):
        ids = encode(tokenizer, text)
        if len(ids) == 1 and ids[0] not in seen:
            found.append((text, ids[0]))
            seen.add(ids[0])

    for w in _WORDS:
        add(" " + w)
    if len(found) < count:
        for tok_id in sorted(tokenizer.get_vocab().values()):
            text = tokenizer.decode([tok_id])
            if re.fullmatch(r" ?[A-Za-z0-9]+", text):
                add(text)
    if len(found) < count:
        raise ExperimentError(f"the tokenizer has only {len(found)} single-token outputs; V' = {count} needs more")
    return found


def counting_tv(contexts: np.ndarray, tokens: np.ndarray, targets: np.ndarray, n_grid) -> np.ndarray:
    """TV [K, m] between the empirical next-token frequencies of the first N samples and the
    targets [m, V'], per context; a context with no sample yet is estimated as uniform."""
    m, V = targets.shape
    out = np.zeros((len(n_grid), m))
    for j, n in enumerate(n_grid):
        counts = np.zeros((m, V))
        np.add.at(counts, (contexts[:n], tokens[:n]), 1.0)
        tot = counts.sum(1, keepdims=True)
        freq = np.where(tot > 0, counts / np.where(tot > 0, tot, 1), 1.0 / V)
        out[j] = 0.5 * np.abs(freq - targets).sum(1)
    return out


def _measure(lm, cfg: GenerationConfig, V: int, pool: list[tuple[str, int]], n_grid, seed: int) -> dict:
    tok = lm.tokenizer
    start, nl = start_ids(tok), encode(tok, "\n")
    queries = [encode(tok, f"context {c + 1} ->") for c in range(cfg.m)]
    K = len(n_grid)
    lm_tv = np.zeros((cfg.draws, K, cfg.m))
    cnt_tv = np.zeros((cfg.draws, K, cfg.m))
    outside = np.zeros((cfg.draws, K, cfg.m))
    tokens = 0  # tokens sent through the LM: the cost measure, independent of machine load
    for r in range(cfg.draws):
        progress(f"generation V'={V}: draw {r + 1}/{cfg.draws} ({tokens:,} LM tokens so far)")
        rng = np.random.default_rng([seed, V, r])
        word_ids = np.array([pool[i][1] for i in rng.choice(len(pool), V, replace=False)])  # [V']
        targets = rng.dirichlet(np.full(V, cfg.concentration), size=cfg.m)  # [m, V]
        n_max = n_grid[-1]
        ctx = rng.integers(cfg.m, size=n_max)
        toks = np.array([rng.choice(V, p=targets[c]) for c in ctx])
        demos = [queries[c] + [int(word_ids[t])] + nl for c, t in zip(ctx, toks)]
        cnt_tv[r] = counting_tv(ctx, toks, targets, n_grid)
        prefix, done = None, 0
        for j, n in enumerate(n_grid):  # nested: extend the cached prefix by the new demos only
            new = [t for dm in demos[done:n] for t in dm]
            prefix = compute_prefix(lm, ids=(start if prefix is None else []) + new, base=prefix)
            tokens += len(new) + sum(len(q) for q in queries)
            done = n
            lp = next_token_logprobs(lm, queries, prefix=prefix, batch_size=cfg.batch_size)  # [m, vocab]
            q = np.exp(lp[:, word_ids].astype(np.float64))  # [m, V']
            mass = q.sum(1)
            lm_tv[r, j] = 0.5 * np.abs(q / mass[:, None] - targets).sum(1)
            outside[r, j] = 1.0 - mass
    return {"lm_tv": lm_tv, "count_tv": cnt_tv, "outside": outside, "tokens": tokens}


def _regime(n_grid, m: int, V: int) -> float:
    """Smallest N of the fitted regime: N >= m V' (enough samples per context and word for
    the 1/sqrt(N) behaviour), or the three largest N when fewer than three reach it."""
    ok = [n for n in n_grid if n >= m * V]
    return float(ok[0] if len(ok) >= 3 else n_grid[max(0, len(n_grid) - 3)])


def plot_generation(out: Path, results: dict) -> list[str]:
    """The PNGs of a results dict (also one read back from results.json) -> their file names."""
    curves, out = results["curves"], Path(out)
    plots = [
        plot_curves(out / "generation_tv_mean.png", [c for c in curves if c["group"] in ("lm_tv_mean", "count_tv_mean")],
                    title="TV to the target (mean over contexts)", ylabel="total variation"),
        plot_curves(out / "generation_tv_max.png", [c for c in curves if c["group"] in ("lm_tv_max", "count_tv_max")],
                    title="TV to the target (max over contexts)", ylabel="total variation"),
        plot_curves(out / "generation_mass_outside.png", [c for c in curves if c["group"] == "mass_outside"],
                    title="LM probability outside the V' words", ylabel="mass outside"),
    ]
    for label, s in results["scaling"].items():
        plots.append(plot_scaling(out / f"generation_scaling_{label.split()[0].lower()}.png", s,
                                  title=f"{label}: TV·sqrt(N/V') across V'", xlabel="V'", ylabel="TV · sqrt(N / V')"))
    return [p.name for p in plots]


def run_generation(out: Path, *, lm, config: GenerationConfig, seed: int = 0) -> dict:
    """Run the experiment, write results.json, report.md and PNGs into `out`; return the results."""
    t0 = time.perf_counter()
    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool = output_tokens(lm.tokenizer, max(cfg.vocab_sizes))
    ctx_len = lm.context_length
    tok = lm.tokenizer
    demo_len = max(len(encode(tok, f"context {c + 1} ->")) for c in range(cfg.m)) + 1 + len(encode(tok, "\n"))
    fits = [n for n in cfg.n_grid if len(start_ids(tok)) + (n + 1) * demo_len <= ctx_len]  # + the query
    if len(fits) < len(cfg.n_grid):
        dropped = [n for n in cfg.n_grid if n not in fits]
        notes_ctx = [f"N = {dropped} left out: longer than the LM's {ctx_len}-token context"]
    else:
        notes_ctx = []
    if not fits:
        raise ExperimentError(f"no N of {cfg.n_grid} fits the LM's context of {ctx_len} tokens")
    grid = np.array(fits)
    curves, raw, lm_tokens = [], {}, 0
    kw = dict(n_boot=cfg.n_boot, seed=seed)
    pred = PREDICTED_SLOPE[Bound.TEXT_GENERATION]
    basis = "text-generation bound N = O(m V/eps^2 log(m/delta))"
    for V in cfg.vocab_sizes:
        m = _measure(lm, cfg, V, pool, fits, seed)
        lm_tokens += m.pop("tokens")
        raw[V] = m
        n_min = _regime(fits, cfg.m, V)
        pre = [] if n_min >= cfg.m * V else [f"pre-asymptotic: N/m < V' = {V} over the fitted N"]
        mass_out = float(m["outside"].mean())
        lm_notes = [f"finite context {ctx_len} tokens and float32 logits", *notes_ctx, *pre,
                    f"{mass_out:.0%} of the LM's probability lies outside the {V} words (renormalised away)"]
        for agg, fn in (("mean", np.mean), ("max", np.max)):
            curves.append(curve(f"LM TV {agg} V'={V}", grid, fn(m["lm_tv"], axis=2), group=f"lm_tv_{agg}",
                                metric=f"TV to the target, {agg} over {cfg.m} contexts", predicted=pred, basis=basis,
                                n_min=n_min, notes=lm_notes, **kw))
            curves.append(curve(f"counting TV {agg} V'={V}", grid, fn(m["count_tv"], axis=2),
                                group=f"count_tv_{agg}", metric=f"TV to the target, {agg} over {cfg.m} contexts",
                                predicted=-0.5, basis="known rate of empirical frequencies sqrt(V'm/N)",
                                n_min=n_min, notes=pre, **kw))
        curves.append(curve(f"mass outside V'={V}", grid, m["outside"].mean(axis=2), group="mass_outside",
                            metric="LM probability outside the V' words", predicted=None, basis="not bounded by the theory",
                            **kw))

    scaling = {}
    if len(cfg.vocab_sizes) >= 2:
        top = fits[max(0, len(fits) - 3):]  # most asymptotic N: the three largest
        idx = [fits.index(n) for n in top]
        for key, label in (("lm_tv", "LM TV mean"), ("count_tv", "counting TV mean")):
            scaling[label] = scaling_check(
                cfg.vocab_sizes, [raw[V][key].mean(axis=2)[:, idx] for V in cfg.vocab_sizes], top,
                n_exponent=-0.5, param_exponent=0.5, n_boot=cfg.n_boot, seed=seed).to_json()
    v_lo, v_hi = min(cfg.vocab_sizes), max(cfg.vocab_sizes)
    log_v_exp = 0.5 * math.log(math.log(v_hi) / math.log(v_lo)) / math.log(v_hi / v_lo) if v_hi > v_lo else None

    results = {
        "experiment": "generation", "settings": asdict(cfg), "seed": seed, "lm": lm_info(lm),
        "machine": machine_info(), "n_grid_used": fits, "curves": curves, "scaling": scaling,
        "bounded_context_v_exponent": log_v_exp, "verdicts": verdict_counts(curves), "lm_tokens": lm_tokens,
        "theory_table": theory_table(0.1, 0.05, V=max(cfg.vocab_sizes), m=cfg.m, l=1, d=1),
        "raw": {str(V): m for V, m in raw.items()},
    }
    results["plots"] = plot_generation(out, results)
    return finish(out, results, t0, lambda res: _report(res, cfg))


def _report(res: dict, cfg: GenerationConfig) -> str:
    lines = [
        "# Bounds experiment: text generation (total variation)", "",
        run_line(res),
        f"V' {list(cfg.vocab_sizes)}, m = {cfg.m} contexts, N {res['n_grid_used']}, {cfg.draws} draws, "
        f"targets ~ Dirichlet({cfg.concentration:g}). Fitted regime: N >= m·V' (or the 3 largest N).",
        "Intervals: 95% percentile bootstrap over draws.", "",
        "## Verdicts", "", *[verdict_line(c) for c in res["curves"] if c["predicted"] is not None], "",
    ]
    for label, s in res["scaling"].items():
        lo, hi = s["slope_ci"]
        lines.append(
            f"- **scaling across V', {label}**: TV·sqrt(N/V') = "
            f"{', '.join('–' if v is None else f'{v:.3g}' for v in s['normalised'])} for V' = "
            f"{', '.join(f'{p:g}' for p in s['params'])}; max/min {s['ratio'] if s['ratio'] is not None else float('nan'):.3g}; "
            f"TV ∝ V'^{s['measured_exponent']:.2f} (normalised slope {s['slope']:.3g} "
            f"[{'–' if lo is None else f'{lo:.3g}'}, {'–' if hi is None else f'{hi:.3g}'}]); predicted V'^0.5 "
            f"(m·V bound) → **{s['verdict']}**")
    if res["bounded_context_v_exponent"] is not None and res["scaling"]:
        lines.append(f"  - the bounded-context bound's sqrt(log V') corresponds to V'^"
                     f"{res['bounded_context_v_exponent']:.2f} over this range of V'.")
    lines += ["", "## Fits", "", fits_table(res["curves"]), "",
              "## Theory (constants hidden: shapes only)", "", format_theory_table(res["theory_table"]), "",
              "## Points", "", points_table(res["curves"]), ""]
    return "\n".join(lines)
