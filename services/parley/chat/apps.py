from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "parley.chat"
    label = "chat"
    verbose_name = "Chat"
