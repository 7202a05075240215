"""URL wiring of the web service: pages, JSON API, admin, health."""

from django.contrib import admin
from django.urls import include, path

from parley.web import health
from parley.web.api import api, api_not_found

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("api/v1/", api.urls),
    path("api/v1/<path:rest>", api_not_found),
    path("admin/", admin.site.urls),
    path("", include("parley.web.urls")),
]
