"""`fwlora report`: tables, paired statistics, verdicts and figures from finished run directories.

Everything in report.md is computed from the runs' result.json files (read through fwlora.records, any
schema version); nothing is typed by hand. The stages pass frozen objects:

    load      run directories -> Run -> Protocol (the runs compared with each other; bench.json: BenchInfo)
    columns   Columns: the labels (a method, or a bench's variant of one), the reference, the rival
    cells     Cell -> ColumnStats per column, and the paired differences between columns
              (stats.py: MeanStd, PairedInterval, RatioSummary)
    matrices  per-matrix numbers any method's runs give (rank patterns, importance against update)
    verdicts  the verdict lines, pooled over budgets (BudgetPool) and over tasks (TaskPool)
    settings  what the runs were made with, against the reference protocol, and where they ran
    summary   ProtocolReport: all of the above for one protocol, and each method's own section
              (Method.report_section, through the registry)
and the outputs are views over a ProtocolReport:
    render, header     report.md
    plots, heatmaps    the PNGs (matplotlib imported where they draw)
    write              write_report; summary.json (the dataclasses' fields), summary.csv (CsvRow)

Statistics. Per (task, budget, column): mean and sample std over seeds of the task metric, at the final and
at the best epoch (best in the metric's direction). Time ratios to the reference: the median over seeds of
(column's time / reference's time with the same seed, task and budget), from the total training time and
from the median step time. Paired differences over seeds with a Student t 95 % interval; pooled per task
over budgets (pairs = budget x seed).
"""

from fwlora.analysis import layer_kind_grid, order_kinds
from fwlora.report.cells import Cell, ColumnStats, SeedCount
from fwlora.report.columns import Columns, columns_of, default_reference
from fwlora.report.load import (BenchInfo, LrChoice, Protocol, Run, budget_label_of, discover, load_run,
                                relevant, split_by_settings)
from fwlora.report.render import detail_table, main_table, protocol_markdown
from fwlora.report.settings import REFERENCE_PROTOCOL, protocol_env, protocol_settings, reduced_protocol
from fwlora.report.stats import (CONFIDENCE, MAJORITY_TOLERANCE, MeanStd, PairedInterval, RatioSummary,
                                 at_majority, difference_verdict, mean_std, median_ratio, paired_ci,
                                 per_seed_ratios)
from fwlora.report.summary import ProtocolReport, report_view, summarise_protocol
from fwlora.report.text import (fmt, fmt_ci, fmt_mean_std, fmt_ratio, fmt_signed, fmt_value, markdown_table,
                                slug)
from fwlora.report.verdicts import BudgetPool, TaskPool, cell_verdicts, pool_over_budgets, pool_over_tasks
from fwlora.report.write import CsvRow, WrittenReport, summary_csv, write_plots, write_report

__all__ = [
    "BenchInfo", "BudgetPool", "CONFIDENCE", "Cell", "ColumnStats", "Columns", "CsvRow", "LrChoice",
    "MAJORITY_TOLERANCE", "MeanStd", "PairedInterval", "Protocol", "ProtocolReport", "REFERENCE_PROTOCOL",
    "RatioSummary", "Run", "SeedCount", "TaskPool", "WrittenReport", "at_majority", "budget_label_of",
    "cell_verdicts", "columns_of", "default_reference", "detail_table", "difference_verdict", "discover",
    "fmt", "fmt_ci", "fmt_mean_std", "fmt_ratio", "fmt_signed", "fmt_value", "layer_kind_grid", "load_run",
    "main_table", "markdown_table", "mean_std", "median_ratio", "order_kinds", "paired_ci", "per_seed_ratios",
    "pool_over_budgets", "pool_over_tasks", "protocol_env", "protocol_markdown", "protocol_settings",
    "reduced_protocol", "relevant", "report_view", "slug", "split_by_settings", "summarise_protocol",
    "summary_csv", "write_plots", "write_report",
]
