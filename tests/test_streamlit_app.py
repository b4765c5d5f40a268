"""The entry point streamlit_app.py: its menu holds every page, and it opens on the Data page."""

from __future__ import annotations

from app_helpers import PROJECT_ROOT, page

import ui


def test_every_page_script_is_in_the_menu_once():
    scripts = [script for script, _, _ in ui.PAGES]
    assert len(set(scripts)) == len(scripts)
    assert sorted(scripts) == sorted(f"pages/{p.name}" for p in (PROJECT_ROOT / "pages").glob("*.py"))
    assert len({title for _, title, _ in ui.PAGES}) == len(ui.PAGES)  # titles are the URLs


def test_opens_on_the_data_page_and_switches_pages(app_env):
    at = page("streamlit_app.py").run()
    assert not at.exception
    assert at.title[0].value == "Chest X-ray pneumonia workbench"
    at.switch_page("pages/1_Train.py").run()
    assert not at.exception
    assert at.title[0].value == "Train"
