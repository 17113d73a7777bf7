"""Turn a data contract into a Great Expectations suite and run it on a pandas frame.

Great Expectations is imported inside the functions: it takes about 3 s to import, and modules that
only need the contract should not pay for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from html import escape
from typing import TYPE_CHECKING, Any

from data_contracts.contract import Contract

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationSuite, ExpectationSuiteValidationResult
    from great_expectations.render.view import DefaultJinjaPageView

# dtype names GX's type-list check accepts for a sensor (numpy names and pandas nullable dtypes).
NUMERIC_TYPES = (
    "float64",
    "float32",
    "float16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "Float64Dtype",
    "Float32Dtype",
    "Int64Dtype",
    "Int32Dtype",
    "Int16Dtype",
    "Int8Dtype",
)
# naive datetimes only: callers normalise tz-aware timestamps to naive UTC before validation.
DATETIME_TYPES = ("datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]")
LABEL_VALUES = (0, 1)
EXAMPLES = 5
# GX pins this module's logger to INFO and logs a line per ephemeral context.
_NOISY_LOGGERS = ("great_expectations", "great_expectations.data_context.types.base")


@dataclass(frozen=True)
class Outcome:
    """One expectation's result in plain Python: GX's ``result`` dict and any evaluation error."""

    rule: str
    column: str | None
    success: bool
    kwargs: dict[str, Any]
    result: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class SuiteRun:
    """A suite's outcomes, and GX's own result of the run (what Data Docs render)."""

    outcomes: list[Outcome]
    result: ExpectationSuiteValidationResult


@dataclass(frozen=True)
class DocsSummary:
    """The head of a Data Docs page: a title, a status line and a table (one row per rule)."""

    suite: str
    title: str
    status: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def suite_name(contract: Contract) -> str:
    """The GX suite's name: ``<contract>_v<version>``."""
    return f"{contract.name}_v{contract.version}"


def build_suite(contract: Contract) -> ExpectationSuite:
    """The GX suite for the warehouse form of ``contract``'s readings (``entity``, ``ts``, ...)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    columns = contract.warehouse_columns
    expectations: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    expectations += [gxe.ExpectColumnToExist(column=name) for name in columns]
    if contract.extra_columns == "forbid":
        expectations.append(gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True))
    expectations += [
        gxe.ExpectColumnValuesToNotBeNull(column="entity"),
        gxe.ExpectColumnValuesToNotBeNull(column="ts"),
        gxe.ExpectColumnValuesToBeInTypeList(column="ts", type_list=list(DATETIME_TYPES)),
    ]
    for sensor in contract.sensors:
        expectations.append(
            gxe.ExpectColumnValuesToBeInTypeList(column=sensor.name, type_list=list(NUMERIC_TYPES))
        )
        if not sensor.nullable:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=sensor.name))
        if sensor.min is not None or sensor.max is not None:
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=sensor.name, min_value=sensor.min, max_value=sensor.max
                )
            )
    if contract.has_label:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABEL_VALUES))
        )
    return gx.ExpectationSuite(
        name=suite_name(contract),
        expectations=expectations,
        meta={"contract": contract.name, "contract_version": contract.version},
    )


def run_suite(suite: ExpectationSuite, frame: pd.DataFrame) -> SuiteRun:
    """Validate ``frame`` in an ephemeral GX context; up to ``EXAMPLES`` offending rows each."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.pandas_default.read_dataframe(frame)
    validation = batch.validate(
        suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    )
    outcomes = [
        Outcome(
            rule=item.expectation_config.type,
            column=item.expectation_config.kwargs.get("column"),
            success=bool(item.success),
            kwargs=dict(item.expectation_config.kwargs),
            result=dict(item.result),
            error=_error_message(item.exception_info),
        )
        for item in validation.results
    ]
    return SuiteRun(outcomes, validation)


def data_docs_html(summary: DocsSummary, result: ExpectationSuiteValidationResult | None) -> str:
    """One Data Docs page: ``summary`` first, then GX's rendering of ``result`` if there is one.

    GX's own page renderer and view, without a site: no index, no copied assets (the page loads
    GX's styles from their CDN when online and stays readable offline). The summary's text is
    HTML-escaped: it quotes values from the data.
    """
    from great_expectations.render.components import (
        RenderedDocumentContent,
        RenderedHeaderContent,
        RenderedSectionContent,
        RenderedTableContent,
    )
    from great_expectations.render.renderer import ValidationResultsPageRenderer

    head = RenderedSectionContent(
        section_name="Data contract",
        content_blocks=[
            RenderedHeaderContent(header=escape(summary.title), subheader=escape(summary.status)),
            RenderedTableContent(
                table=[[escape(cell) for cell in row] for row in summary.rows],
                header_row=[escape(cell) for cell in summary.header],
                styling={"body": {"classes": ["table", "table-sm"]}},
            ),
        ],
    )
    if result is None:
        document = RenderedDocumentContent(
            sections=[head],
            renderer_type="ValidationResultsPageRenderer",
            expectation_suite_name=summary.suite,
        )
    else:
        document = ValidationResultsPageRenderer().render(result)
        document.sections.insert(0, head)
    return str(_page_view().render(document, show_how_to_buttons=False))


@cache
def _page_view() -> DefaultJinjaPageView:
    """GX's page view, made once: its Jinja environment keeps the compiled templates."""
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView()


def _error_message(info: dict[str, Any] | None) -> str | None:
    """GX nests exception info per metric when a metric fails; return the first message."""
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None
