"""Settings for every Parley process, read from the environment only (12-factor).

Development works with no variables set. With DEBUG off the process refuses to start
on an insecure setting (the default SECRET_KEY, an empty ALLOWED_HOSTS), and
`parley manage check --deploy` is clean with production values.
"""

from __future__ import annotations

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # services/parley

env = environ.Env()

DEV_SECRET_KEY = "parley-insecure-development-key-do-not-use-in-production"

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env.str("SECRET_KEY", default=DEV_SECRET_KEY)
ALLOWED_HOSTS = env.list(
    "ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else []
)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

if not DEBUG:
    if SECRET_KEY == DEV_SECRET_KEY or len(SECRET_KEY) < 50:
        raise ImproperlyConfigured(
            "DEBUG is off but SECRET_KEY is the development default or shorter than 50 "
            "characters. Set SECRET_KEY to a long random value."
        )
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured(
            "DEBUG is off but ALLOWED_HOSTS is empty. Set ALLOWED_HOSTS to the host "
            "names that serve Parley (comma-separated)."
        )

# --- Parley's own settings -------------------------------------------------
PARLEY_ALLOW_SIGNUP = env.bool("PARLEY_ALLOW_SIGNUP", default=True)
PARLEY_MAX_MESSAGE_CHARS = env.int("PARLEY_MAX_MESSAGE_CHARS", default=4000)
PARLEY_RATE_MESSAGES_PER_10S = env.int("PARLEY_RATE_MESSAGES_PER_10S", default=50)
# The WebSocket URL that pages connect to; empty means same origin, path /ws/chat/.
REALTIME_PUBLIC_URL = env.str("REALTIME_PUBLIC_URL", default="")
# Identifies this process in `hello` frames and presence (the pod name in Kubernetes).
PARLEY_NODE_ID = env.str("PARLEY_NODE_ID", default="")
# Base URL used in links inside emails.
PARLEY_PUBLIC_URL = env.str("PARLEY_PUBLIC_URL", default="http://localhost:8000")

# --- Django ------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "ninja",
    "parley.accounts",
    "parley.chat",
    "parley.web",
    "parley.realtime",
    "parley.worker",
]

MIDDLEWARE = [
    "parley.web.middleware.ProbeMiddleware",
    "parley.web.middleware.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "parley.web.middleware.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "parley.config.urls"
WSGI_APPLICATION = "parley.config.wsgi.application"
ASGI_APPLICATION = "parley.config.asgi.application"
AUTH_USER_MODEL = "accounts.User"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "conversation-list"
LOGOUT_REDIRECT_URL = "login"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "parley.web.context.parley",
            ],
        },
    }
]

# --- Database ----------------------------------------------------------------
# One pool per process (psycopg_pool through Django's native pooling). Size it per
# process: web workers use 1 connection per thread; the realtime process uses one per
# database_sync_to_async thread. DB_POOL_MAX_SIZE x processes must stay under
# Postgres' max_connections (see docs/operations.md).
DATABASE_URL = env.str("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/parley")
_db = environ.Env.db_url_config(DATABASE_URL)
_db["ENGINE"] = "django.db.backends.postgresql"
_db.setdefault("OPTIONS", {})
DB_POOL = env.bool("DB_POOL", default=True)
if DB_POOL:
    _db["OPTIONS"]["pool"] = {
        "min_size": env.int("DB_POOL_MIN_SIZE", default=1),
        "max_size": env.int("DB_POOL_MAX_SIZE", default=10),
        "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),
    }
    _db["CONN_MAX_AGE"] = 0
else:
    _db["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    _db["CONN_HEALTH_CHECKS"] = True
_db["OPTIONS"].setdefault("connect_timeout", 5)
DATABASES = {"default": _db}

# --- Redis: channel layer, broker, presence, rate limits, cache ---------------
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CHANNEL_LAYER_URL = env.str("CHANNEL_LAYER_URL", default=REDIS_URL)
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
# "pubsub": one PUBLISH per group event, each replica fans out locally (the default;
# see docs/benchmarks.md). "core": channels_redis' RedisChannelLayer, one list write
# per member (kept for the naive benchmark configuration).
CHANNEL_LAYER_BACKEND = env.str("CHANNEL_LAYER_BACKEND", default="pubsub")
# Pub/sub channels are global to a Redis server (not per database number): deployments
# that share one Redis must use different prefixes.
CHANNEL_LAYER_PREFIX = env.str("CHANNEL_LAYER_PREFIX", default="parley")
# Several hosts shard groups across Redis servers: comma-separated URLs. Or Redis
# Sentinel for failover: CHANNEL_LAYER_SENTINELS=host:port,host:port plus the master name.
_layer_socket = {
    # redis-py's default 5 s socket timeout equals channels_redis' 5 s blocking read,
    # which crashes idle readers (redis-py #4091): keep it well above.
    "socket_timeout": env.float("CHANNEL_LAYER_SOCKET_TIMEOUT", default=30.0),
    "socket_connect_timeout": 5,
    "health_check_interval": 15,
    "socket_keepalive": True,
}
CHANNEL_LAYER_SENTINELS = env.list("CHANNEL_LAYER_SENTINELS", default=[])
if CHANNEL_LAYER_SENTINELS:
    _layer_hosts = [
        {
            "sentinels": [
                (h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]) if ":" in h else 26379)
                for h in CHANNEL_LAYER_SENTINELS
            ],
            "master_name": env.str("CHANNEL_LAYER_SENTINEL_MASTER", default="mymaster"),
            "password": env.str("CHANNEL_LAYER_SENTINEL_PASSWORD", default="") or None,
            **_layer_socket,
        }
    ]
else:
    _layer_hosts = [
        {"address": url.strip(), **_layer_socket}
        for url in CHANNEL_LAYER_URL.split(",")
        if url.strip()
    ]
if CHANNEL_LAYER_BACKEND == "core":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": _layer_hosts,
                "prefix": CHANNEL_LAYER_PREFIX,
            },
        }
    }
elif CHANNEL_LAYER_BACKEND == "memory":
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            # channels_redis' pub/sub layer, decoding a group message once per node
            # instead of once per local receiver (parley/realtime/layers.py).
            "BACKEND": "parley.realtime.layers.SharedDecodePubSubChannelLayer",
            "CONFIG": {"hosts": _layer_hosts, "prefix": CHANNEL_LAYER_PREFIX},
        }
    }

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "parley:cache",
        "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 5},
    }
}

# --- Celery ------------------------------------------------------------------
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)

# --- Auth --------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 8},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

# --- I18N, static ------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "/static/"
STATIC_ROOT = env.str("STATIC_ROOT", default=str(PACKAGE_DIR.parent.parent / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG or env.bool("WHITENOISE_USE_FINDERS", default=False)

# --- Email -------------------------------------------------------------------
if "EMAIL_URL" in os.environ:
    vars().update(env.email_url("EMAIL_URL"))
else:
    EMAIL_BACKEND = env.str(
        "EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend"
    )
    EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
    EMAIL_PORT = env.int("EMAIL_PORT", default=25)
    EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
    EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
    EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="Parley <parley@localhost>")

# --- Security (production differs only by environment) ------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # the page script reads it to POST with fetch
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
    # TLS ends at the ingress/front door; it tells us the scheme.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # Probes and scrapers speak plain HTTP inside the cluster.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

# --- Logging -----------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOG_FORMAT = env.str("LOG_FORMAT", default="console")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "parley.config.logging.JsonFormatter"},
        "console": {"()": "parley.config.logging.ConsoleFormatter"},
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "console",
        }
    },
    "root": {"handlers": ["stderr"], "level": LOG_LEVEL},
    "loggers": {
        "django.server": {"level": "WARNING"},
        # The request log line comes from parley.web.middleware; Django's own
        # 4xx warnings would duplicate it.
        "django.request": {"level": "ERROR"},
    },
}
