"""webui entry: the RealSR upscalers, the Extras API route and the RealSR settings (logic in realsr_webui/)."""

from modules import script_callbacks

from realsr_webui import api, host
from realsr_webui.upscaler import UpscalerRealSR  # noqa: F401 - defining it registers it with the webui

host.register_settings()
script_callbacks.on_app_started(lambda _demo, app: api.register(app))
