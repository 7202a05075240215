from django.urls import path

from parley.web import views

urlpatterns = [
    path("", views.home, name="home"),
]
