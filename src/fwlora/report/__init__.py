"""`fwlora report`: tables, paired statistics, verdicts and plots from finished run directories.

Everything in report.md is computed from the runs' result.json files (read through fwlora.records, any
schema version); nothing is typed by hand.

    load       run directories -> runs (one column per label: a method or a bench variant) -> protocols
    stats      mean/std, paired t intervals, median of per-seed ratios, verdicts (pure)
    columns    the protocol's columns: labels, their methods, the reference and the rival (from the registry)
    aggregate  per-cell and per-column statistics, comparisons with the reference and the rival
    verdicts   the verdict lines, pooled over budgets and over tasks
    matrices   per-matrix numbers: the open question on FW-LoRA's weighting, final rank patterns
    settings   what the runs were made with, against the protocol of docs/method.md
    plots      the PNGs (matplotlib imported lazily)
    render     report.md, summary.json, summary.csv; write_report

Statistics. Per (task, budget, column): mean and sample std over seeds of the task metric, at the final and
at the best epoch (best in the metric's direction). Time ratios to the reference (LoRA): the median over
seeds of (column's time / reference's time with the same seed, task and budget), from the total training
time and from the median step time. Paired differences over seeds with a Student t 95 % interval; pooled
per task over budgets (pairs = budget x seed).
"""

from fwlora.report.aggregate import method_stats, seeds_text, summarise_protocol, task_metric
from fwlora.report.columns import Columns, columns_of, default_reference
from fwlora.report.verdicts import cell_verdicts, pooled, pooled_lines
from fwlora.report.load import Protocol, Run, budget_label_of, discover, load_run, relevant, split_by_settings
from fwlora.report.matrices import matrix_question
from fwlora.analysis import layer_kind_grid, order_kinds
from fwlora.report.plots import write_plots
from fwlora.report.render import detail_table, main_table, protocol_markdown, summary_csv, write_report
from fwlora.report.settings import REFERENCE_PROTOCOL, protocol_env, protocol_settings, reduced_protocol
from fwlora.report.stats import (CONFIDENCE, MAJORITY_TOLERANCE, at_majority, difference_verdict, mean_std, median_ratio,
                                 paired_ci, per_seed_ratios)
from fwlora.report.text import fmt, fmt_ci, fmt_mean_std, fmt_ratio, fmt_signed, fmt_value, markdown_table, slug

__all__ = [
    "CONFIDENCE", "Columns", "MAJORITY_TOLERANCE", "Protocol", "REFERENCE_PROTOCOL", "Run", "at_majority",
    "budget_label_of", "cell_verdicts", "columns_of", "default_reference", "detail_table", "difference_verdict", "discover", "fmt", "fmt_ci",
    "fmt_mean_std", "fmt_ratio", "fmt_signed", "fmt_value", "layer_kind_grid", "load_run",
    "main_table", "markdown_table", "matrix_question", "mean_std", "median_ratio", "method_stats", "order_kinds",
    "paired_ci", "per_seed_ratios", "pooled", "pooled_lines", "protocol_env", "protocol_markdown", "protocol_settings",
    "reduced_protocol", "relevant", "seeds_text", "slug", "split_by_settings", "summarise_protocol", "summary_csv",
    "task_metric", "write_plots", "write_report",
]
