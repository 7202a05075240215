"""Forms of the server-rendered pages.

They only shape and pre-check input for the browser (required fields, lengths the HTML
can enforce); the rules themselves live in the services, which the views call and whose
DomainErrors the views show to the user.
"""

from __future__ import annotations

import uuid

from django import forms
from django.conf import settings

from parley.chat.services import CLIENT_ID_MAX


class SignupForm(forms.Form):
    username = forms.CharField(
        max_length=150,
        help_text="Letters, digits and @ . + - _ only.",
        widget=forms.TextInput(
            attrs={"autocomplete": "username", "autocapitalize": "none", "autofocus": True}
        ),
    )
    display_name = forms.CharField(
        label="Display name",
        max_length=80,
        required=False,
        help_text="Shown next to your messages. Leave empty to use your username.",
        widget=forms.TextInput(attrs={"autocomplete": "name"}),
    )
    email = forms.EmailField(
        required=False,
        help_text="Used to tell you about messages you missed.",
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
    )
    password1 = forms.CharField(
        label="Password",
        strip=False,
        help_text="At least 8 characters, not only digits, not a common password.",
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    password2 = forms.CharField(
        label="Password again",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean(self):
        data = super().clean()
        p1, p2 = data.get("password1"), data.get("password2")
        if p1 and p2 and p1 != p2:
            self.add_error("password2", "The two passwords differ.")
        return data


def new_client_id() -> str:
    return uuid.uuid4().hex


class MessageForm(forms.Form):
    """The send form. `client_id` is generated when the page is rendered, so submitting
    the same form twice (a double click, a re-sent POST) creates one message."""

    body = forms.CharField(
        label="Message",
        strip=False,  # leading spaces and blank lines are part of a plain-text message
        widget=forms.Textarea(attrs={"rows": 2, "placeholder": "Write a message"}),
    )
    client_id = forms.CharField(max_length=CLIENT_ID_MAX, required=False, widget=forms.HiddenInput)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("initial", {}).setdefault("client_id", new_client_id())
        super().__init__(*args, **kwargs)
        # A hint for the browser only: the service enforces the limit (and says so).
        self.fields["body"].widget.attrs["maxlength"] = settings.PARLEY_MAX_MESSAGE_CHARS

    def clean_body(self) -> str:
        # Browsers submit textarea line breaks as CRLF; store plain newlines.
        return self.cleaned_data["body"].replace("\r\n", "\n").replace("\r", "\n")

    def clean_client_id(self) -> str | None:
        return self.cleaned_data["client_id"] or None


class RoomForm(forms.Form):
    name = forms.CharField(max_length=80, widget=forms.TextInput(attrs={"autofocus": True}))
    slug = forms.SlugField(
        max_length=80,
        required=False,
        help_text="The room's short name in links. Leave empty to derive it from the name.",
        widget=forms.TextInput(attrs={"autocapitalize": "none"}),
    )
    topic = forms.CharField(max_length=300, required=False)
    public = forms.BooleanField(
        required=False,
        initial=True,
        help_text="Anyone can find and join a public room. Only its members see a private one.",
    )

    def clean_slug(self) -> str:
        return self.cleaned_data["slug"].lower()


class DirectForm(forms.Form):
    username = forms.CharField(
        max_length=150,
        help_text="The username of the person to talk to.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "autocapitalize": "none"}),
    )


class RoomSearchForm(forms.Form):
    q = forms.CharField(
        label="Search rooms",
        max_length=100,
        required=False,
        widget=forms.TextInput(attrs={"type": "search", "placeholder": "Name or topic"}),
    )
