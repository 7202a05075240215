"""URLs of the server-rendered pages. `login` and `conversation-list` are named in settings."""

from django.contrib.auth import views as auth_views
from django.urls import path

from parley.web import views

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup"),
    path(
        "login/",
        auth_views.LoginView.as_view(template_name="login.html", redirect_authenticated_user=True),
        name="login",
    ),
    # Django's LogoutView accepts only POST: a link or a prefetch cannot log anyone out.
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("conversations/", views.conversation_list, name="conversation-list"),
    path("c/<int:conversation_id>/", views.conversation, name="conversation"),
    path("c/<int:conversation_id>/mute/", views.conversation_mute, name="conversation-mute"),
    path("rooms/", views.room_list, name="room-list"),
    path("rooms/new/", views.room_create, name="room-create"),
    path("rooms/<slug:slug>/join/", views.room_join, name="room-join"),
    path("rooms/<slug:slug>/leave/", views.room_leave, name="room-leave"),
    path("direct/", views.direct, name="direct"),
    path("notifications/", views.notification_list, name="notification-list"),
]
