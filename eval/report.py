"""Summaries of a run's results: quality per task and mode, per-mode speed and greedy identity, the
Spec-Bench speed table, rendered for the terminal and as Markdown, plus summary.json and the plots.

Speed numbers aggregate before dividing: tokens/s = all emitted tokens / all decode seconds, and the
mean accepted tokens per target forward = 1 + all accepted / all verification steps (vLLM's mean
acceptance length). The speedup is a mode's tokens/s over the autoregressive baseline's at the same
context length, measured in the same run on the same questions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from eval.modes import BASELINE, MODES, sort_modes
from eval.plots import plot_heatmaps, plot_speed
from eval.result import Result


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def text(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        return "\n".join([self.title, line(self.headers), line(["-" * w for w in widths]),
                          *(line(r) for r in self.rows)])


@dataclass(frozen=True)
class SpeedSummary:
    answers: int
    acceptance_length: float  # mean accepted tokens per target forward, bonus token counted
    tokens_per_second: float
    e2e_tokens_per_second: float  # counting retrieval, question and drafter prefills too
    identical: int  # answers equal to the reference's tokens
    checked: int  # answers that had a reference to compare with


def speed_summary(results: Sequence[Result]) -> SpeedSummary:
    drafts = sum(r.stats.num_drafts for r in results)
    accepted = sum(r.stats.num_accepted_tokens for r in results)
    emitted = sum(r.stats.num_emitted_tokens for r in results)
    decode = sum(r.stats.decode_seconds for r in results)
    wall = sum(r.answer_seconds for r in results)
    checked = [r for r in results if r.identical is not None]
    return SpeedSummary(len(results), 1 + accepted / drafts if drafts else 1.0, emitted / decode if decode else 0.0,
                        emitted / wall if wall else 0.0, sum(r.identical for r in checked), len(checked))


def ordered(values) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def mode_order(results: Sequence[Result]) -> list[str]:
    """The modes present, in eval.modes' order."""
    return sort_modes(r.mode for r in results)


def rounded(values: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def quality_table(results: Sequence[Result]) -> Table | None:
    scored = [r for r in results if r.score is not None]
    if not scored:
        return None
    modes = mode_order(scored)
    rows = []
    for task in ordered(r.task for r in scored):
        cells = [task, str(len({r.example_id for r in scored if r.task == task}))]
        for mode in modes:
            scores = [r.score for r in scored if r.task == task and r.mode == mode]
            cells.append(f"{mean(scores):.2f}" if scores else "")
        rows.append(cells)
    rows.append(["all", str(len({r.example_id for r in scored}))]
                + [f"{mean([r.score for r in scored if r.mode == m]):.2f}" for m in modes])
    return Table("Quality: mean score per task (1 = every reference found / perfect overlap)",
                 ["task", "examples", *modes], rows)


def identity_text(summary: SpeedSummary) -> str:
    return f"{summary.identical}/{summary.checked}" if summary.checked else "-"


def modes_table(results: Sequence[Result]) -> Table:
    rows = []
    for mode in mode_order(results):
        mine = [r for r in results if r.mode == mode]
        summary = speed_summary(mine)
        scores = [r.score for r in mine if r.score is not None]
        reference = mine[0].reference_mode
        rows.append([mode, MODES[mode].description if mode in MODES else "", str(summary.answers),
                     f"{mean(scores):.2f}" if scores else "-",
                     f"{identity_text(summary)} vs {reference}" if reference else "-",
                     f"{summary.acceptance_length:.2f}", f"{summary.tokens_per_second:.1f}",
                     f"{mean([r.answer_seconds for r in mine]):.1f}"])
    return Table("Modes: greedy identity, acceptance and speed over all answers",
                 ["mode", "what", "answers", "mean score", "greedy identical", "mean accepted tokens",
                  "decode tok/s", "s/answer"], rows)


@dataclass(frozen=True)
class SpeedRow:
    length: int
    mode: str
    summary: SpeedSummary
    speedup: float | None  # decode tokens/s over the baseline's; None without a baseline
    e2e_speedup: float | None


def speed_rows(results: Sequence[Result]) -> list[SpeedRow]:
    speed = [r for r in results if r.task == "speed"]
    rows = []
    for length in sorted({r.length for r in speed}):
        at_length = [r for r in speed if r.length == length]
        base = [r for r in at_length if r.mode == BASELINE]
        baseline = speed_summary(base) if base else None
        for mode in mode_order(at_length):
            summary = speed_summary([r for r in at_length if r.mode == mode])
            rows.append(SpeedRow(length, mode, summary,
                                 ratio(summary.tokens_per_second, baseline and baseline.tokens_per_second),
                                 ratio(summary.e2e_tokens_per_second, baseline and baseline.e2e_tokens_per_second)))
    return rows


def ratio(value: float, baseline: float | None) -> float | None:
    return value / baseline if baseline else None


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def speed_table(rows: Sequence[SpeedRow]) -> Table | None:
    if not rows:
        return None
    return Table(f"Speed (Spec-Bench metrics; speedup against {BASELINE} autoregressive decoding, same questions)",
                 ["context", "mode", "answers", "mean accepted tokens", "decode tok/s", "speedup", "e2e speedup",
                  "greedy identical"],
                 [[str(r.length), r.mode, str(r.summary.answers), f"{r.summary.acceptance_length:.2f}",
                   f"{r.summary.tokens_per_second:.1f}", times(r.speedup), times(r.e2e_speedup),
                   identity_text(r.summary)] for r in rows])


def mismatches(results: Sequence[Result]) -> list[str]:
    return [f"{r.example_id} {r.mode} != {r.reference_mode}" for r in results if r.identical is False]


@dataclass(frozen=True)
class Report:
    tables: list[Table]
    files: list[Path]
    summary: dict  # the JSON object printed last

    def text(self) -> str:
        return "\n\n".join(t.text() for t in self.tables)


def summary_object(results: Sequence[Result], rows: Sequence[SpeedRow], run: dict) -> dict:
    checked = [r for r in results if r.identical is not None]
    scored = [r for r in results if r.score is not None]
    return {
        **run,
        "quality": {task: {mode: round(mean(s), 4) for mode in mode_order(scored)
                           if (s := [r.score for r in scored if r.task == task and r.mode == mode])}
                    for task in ordered(r.task for r in scored)},
        "greedy_identity": {"identical": sum(r.identical for r in checked), "checked": len(checked),
                            "mismatches": mismatches(results)},
        "modes": {mode: rounded(asdict(speed_summary([r for r in results if r.mode == mode])))
                  for mode in mode_order(results)},
        "speed": [rounded({"context": r.length, "mode": r.mode, **asdict(r.summary), "speedup": r.speedup,
                           "e2e_speedup": r.e2e_speedup}) for r in rows],
    }


def write_report(results: Sequence[Result], out_dir: Path, title: str, run: dict) -> Report:
    """Write summary.md, summary.json and the PNGs into `out_dir`; `run` (suite, command, timings) goes
    into the JSON summary and the Markdown header."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = speed_rows(results)
    tables = [t for t in (quality_table(results), modes_table(results), speed_table(rows)) if t is not None]
    files = plot_heatmaps(results, out_dir) + plot_speed(rows, out_dir)
    summary = summary_object(results, rows, run)
    identity = summary["greedy_identity"]
    lines = [f"# {title}", "", *(f"- {k}: {v}" for k, v in run.items()), "",
             f"Greedy identity (speculative greedy modes vs their reference, token for token): "
             f"{identity['identical']}/{identity['checked']}", ""]
    lines += [f"- mismatch: {m}" for m in identity["mismatches"]]
    for table in tables:
        lines += [table.markdown(), ""]
    lines += [f"![{f.stem}]({f.name})" for f in files]
    markdown, summary_json = out_dir / "summary.md", out_dir / "summary.json"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary_json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return Report(tables, [markdown, summary_json, *files], summary)
