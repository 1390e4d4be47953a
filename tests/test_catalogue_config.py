"""`batch.catalogue` (docs/contract.md §2, §4.12): on by default with format 2, not used with
format 1, and refused when written out true beside `format: 1`."""

from __future__ import annotations

import pytest

from edge_agent.config.loader import parse_config
from edge_agent.errors import ConfigError

pytestmark = pytest.mark.unit

BASE = "gateway: {id: gw}\nsources: [{type: simulated, name: sim}]\n"


@pytest.mark.parametrize(
    ("batch", "uses"),
    [("", True), ("batch: {catalogue: false}\n", False), ("batch: {format: 1}\n", False),
     ("batch: {format: 1, catalogue: false}\n", False)],
)  # fmt: skip
def test_the_catalogue_is_used_with_format_2_unless_turned_off(batch: str, uses: bool) -> None:
    assert parse_config(BASE + batch).batch.uses_catalogue is uses


def test_catalogue_true_written_out_with_format_1_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + "batch: {format: 1, catalogue: true}\n")
    assert "batch.catalogue" in str(caught.value)
    assert "needs format: 2" in str(caught.value)
