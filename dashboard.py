"""The dashboard's menu: routes between the pages in views/ (thin views over core/); each page also runs on its
own, which is how the AppTests open them. `streamlit run streamlit_app.py` serves this script. The folder is not
called pages/: Streamlit would also serve a pages/ folder as an app of its own, and a page opened by its address
then listed the main script in the menu as a page of its own."""

import streamlit as st

import ui

home, *others = ui.PAGES
navigation = st.navigation(
    [st.Page(home[0], title=home[1], default=True)]
    + [st.Page(script, title=title, url_path=title) for script, title in others])
navigation.run()
