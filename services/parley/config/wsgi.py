"""WSGI entry point of the web service (gunicorn)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "parley.config.settings")

application = get_wsgi_application()
