"""The dashboard's menu (dashboard.py, served by streamlit_app.py): every page once, opening on Data."""

from __future__ import annotations

from app_helpers import PROJECT_ROOT, page

import ui


def test_every_page_script_is_in_the_menu_once():
    scripts = [script for script, _ in ui.PAGES]
    assert len(set(scripts)) == len(scripts)
    assert sorted(scripts) == sorted(f"views/{p.name}" for p in (PROJECT_ROOT / "views").glob("*.py"))
    assert len({title for _, title in ui.PAGES}) == len(ui.PAGES)  # titles are the URLs


def test_the_menu_has_no_icon_that_needs_a_font(app_env, monkeypatch):
    """Emoji need an emoji font (empty boxes without one) and material icons a font from the internet: the
    sidebar menu is text only."""
    import streamlit

    menus = []
    navigation = streamlit.navigation
    monkeypatch.setattr(streamlit, "navigation", lambda pages, **kw: menus.append(pages) or navigation(pages, **kw))
    at = page("dashboard.py").run()
    assert not at.exception
    (menu,) = menus
    assert [p.title for p in menu] == [title for _, title in ui.PAGES]
    assert all(not p.icon for p in menu)
