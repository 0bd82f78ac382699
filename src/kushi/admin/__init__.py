"""The admin side of kushi: the admin listener (``/metrics``, the status page, the PAC file,
``/healthz``) in :mod:`kushi.admin.listener`. It sits above the server and reads its state;
nothing in the proxy core imports it."""

from kushi.admin.listener import AdminPlan, config_view, pac_script, prepare

__all__ = ["AdminPlan", "config_view", "pac_script", "prepare"]
