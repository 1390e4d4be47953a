"""How `edge-agent browse` names points: valid config names, unique within one listing.

(Browsing a real server: test_opcua_browse.py.)
"""

from __future__ import annotations

import pytest

from edge_agent.sources.opcua.browse import point_name

pytestmark = pytest.mark.unit


def test_point_names_are_valid_and_unique() -> None:
    used: set[str] = set()
    assert point_name("Plant.Mill 1.Speed", used) == "Plant.Mill_1.Speed"
    assert point_name("Plant.Mill 1.Speed", used) == "Plant.Mill_1.Speed_2"
    assert len(point_name("x" * 100, used)) == 64
