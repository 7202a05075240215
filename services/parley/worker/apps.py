from django.apps import AppConfig


class WorkerConfig(AppConfig):
    name = "parley.worker"
    label = "worker"
    verbose_name = "Worker"
