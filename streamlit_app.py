"""The dashboard: `streamlit run streamlit_app.py`. This entry point only routes between the pages in
views/ (thin views over core/); each page also runs on its own, which is how the AppTests open them. The folder is
not called pages/: Streamlit would also serve a pages/ folder as an app of its own, and a page opened by its
address then listed this script in the menu as "streamlit app"."""

import streamlit as st

import ui

home, *others = ui.PAGES
navigation = st.navigation(
    [st.Page(home[0], title=home[1], default=True)]
    + [st.Page(script, title=title, url_path=title) for script, title in others])
navigation.run()
