"""The dashboard: `streamlit run streamlit_app.py` (or `bash run.sh app`). Streamlit serves dashboard.py, which
routes between the pages in views/, through the middleware of app_server.py (no 404s in the browser's console
when a page is opened by its address)."""

import streamlit as st
from starlette.middleware import Middleware

from app_server import BackendBaseUrl

app = st.App("dashboard.py", middleware=[Middleware(BackendBaseUrl, base_path=st.get_option("server.baseUrlPath"))])
