"""ASGI entry point of the realtime service (uvicorn + Channels)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")

django_asgi_app = get_asgi_application()

from parley.realtime.routing import build_application  # noqa: E402  (needs Django set up)

application = build_application(django_asgi_app)
