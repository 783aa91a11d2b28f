"""The words of the self-service pages (subscribe, confirm, manage) and of the messages
they send (the confirmation email, the SMS code), per language.

Like `strings.py`: English is complete, another language may translate some keys, and
a language without a translation speaks English. `{name}` placeholders are filled with
`str.format` by the code, never from user input.
"""

from __future__ import annotations

from broadcaster.site.strings import strings_for

__all__ = ["form_strings"]

_EN: dict[str, str] = {
    "back_to_status": "Back to the status page",
    # the form
    "subscribe_heading": "Get status updates",
    "subscribe_intro": "We will tell you when {title} has an incident or a planned "
    "maintenance, how it goes, and when it is over.",
    "address_email_sms": "Email address or mobile number",
    "address_email": "Email address",
    "address_sms": "Mobile number",
    "address_hint_sms": "A mobile number with its country code, like +33 6 12 34 56 78.",
    "sms_note": "Text messages: your operator's usual rates apply. Reply STOP to any of "
    "them to stop them.",
    "language_label": "Language of the messages",
    "components_legend": "What to tell you about",
    "submit": "Subscribe",
    "working": "Checking that a person is using this form… (this takes a second)",
    "noscript": "This form needs JavaScript: your browser solves a small puzzle that keeps "
    "robots from sending messages through it.",
    "privacy": "We use your address only to send these updates. Every message says how "
    "to stop them.",
    # answers to the form
    "sent_heading": "Check your inbox",
    "sent": "If {address} can receive our emails, a message with a confirmation link is "
    "on its way. Open the link within {hours} hours to start receiving updates: nothing is "
    "sent to you before that.",
    "sent_spam": "Nothing after a few minutes? Look in your spam folder.",
    "code_heading": "Enter the code",
    "code_sent": "We sent a 6-digit code by text message to {address}. It works for "
    "{minutes} minutes.",
    "code_label": "Code",
    "verify": "Confirm",
    "code_wrong": "That code is not the right one. Attempts left: {left}.",
    "code_locked": "Too many wrong codes: this code no longer works. Ask for a new one "
    "with the subscribe form.",
    "code_expired": "This code has expired. Ask for a new one with the subscribe form.",
    "start_again": "Subscribe again",
    # confirmation
    "confirmed_heading": "You are subscribed",
    "confirmed_email": "You will receive {title} updates by email.",
    "confirmed_sms": "You will receive {title} updates by text message.",
    "used_heading": "Already confirmed",
    "used": "This confirmation was already used: the subscription is active.",
    "manage_link": "Change or stop them at any time",
    # links
    "link_invalid_heading": "This link does not work",
    "link_invalid": "This link is not valid. Check that you opened it whole, or subscribe again.",
    "link_expired_heading": "This link has expired",
    "link_expired": "This link has expired. Subscribe again to receive a new one.",
    # manage
    "manage_heading": "Your status updates",
    "manage_channels": "Messages",
    "channel_email": "By email to {address}",
    "channel_sms": "By text message to {address}",
    "channel_telegram": "On Telegram",
    "channel_webhook": "To your webhook at {address}",
    "sms_stopped": "Text messages to {address} are stopped. To receive them again, "
    "subscribe with the form or text START to the number they came from.",
    "telegram_stopped": "Telegram messages are stopped. To receive them again, send "
    "/subscribe to our bot.",
    "webhook_stopped": "Posts to your webhook at {address} are stopped.",
    "save": "Save",
    "unsubscribe_all": "Stop all messages",
    "saved": "Your choices are saved.",
    "unsubscribed": "You will not receive any more messages. You can subscribe again at any time.",
    "all_stopped": "You receive no messages at the moment.",
    # refusals
    "error_heading": "Please check the form",
    "invalid_email": "This is not an email address we can write to.",
    "invalid_phone": "This is not a mobile number we can text. Write it with its country "
    "code, like +33 6 12 34 56 78.",
    "address_missing": "Write an email address or a mobile number.",
    "email_off": "Updates by email are not offered here.",
    "sms_off": "Updates by text message are not offered here: use an email address.",
    "sms_country": "We cannot send text messages to numbers of this country. Subscribe "
    "by email instead.",
    "sms_not_mobile": "We can only send text messages to mobile numbers.",
    "no_component": "Choose at least one thing to be told about.",
    "form_expired": "The form had expired. Please send it again.",
    "cookie_missing": "Your browser did not send this form's cookie back. Allow cookies "
    "for this site, then send the form again.",
    "proof_failed": "The check that a person is using this form did not pass. Make sure "
    "JavaScript is on, then send the form again.",
    "address_limit": "Too many confirmation messages went to this address today. Try "
    "again tomorrow.",
    "sms_cap": "Subscribing by text message is paused until tomorrow. Subscribe by email, "
    "or try again later.",
    "send_failed": "We could not send the message just now. Please try again in a few minutes.",
    "unavailable": "Subscriptions are not available right now. Please try again later.",
    # the confirmation email and the SMS code
    "confirm_subject": "Confirm your subscription to {title}",
    "confirm_email": "Hello,\n\nSomeone, probably you, asked to receive {title} updates at "
    "this address.\n\nTo confirm, open this link within {hours} hours:\n{url}\n\nIf it was "
    "not you, ignore this email: nothing more will be sent to you.",
    "confirm_sms": "{code} is your code to receive {title} updates. It works for {minutes} "
    "minutes.",
}

_FR: dict[str, str] = {
    "back_to_status": "Retour à la page d'état",
    "subscribe_heading": "Recevoir les mises à jour",
    "subscribe_intro": "Nous vous prévenons quand {title} a un incident ou une maintenance "
    "planifiée, de son évolution et de sa fin.",
    "address_email_sms": "Adresse e-mail ou numéro de mobile",
    "address_email": "Adresse e-mail",
    "address_sms": "Numéro de mobile",
    "address_hint_sms": "Un numéro de mobile avec son indicatif, comme +33 6 12 34 56 78.",
    "sms_note": "SMS\u00a0: le tarif habituel de votre opérateur s'applique. Répondez STOP "
    "à l'un d'eux pour ne plus en recevoir.",
    "language_label": "Langue des messages",
    "components_legend": "Ce qui vous intéresse",
    "submit": "S'abonner",
    "working": "Vérification qu'une personne utilise ce formulaire… (cela prend une seconde)",
    "noscript": "Ce formulaire a besoin de JavaScript\u00a0: votre navigateur résout une "
    "petite énigme qui empêche des robots d'envoyer des messages par lui.",
    "privacy": "Votre adresse ne sert qu'à ces mises à jour. Chaque message dit comment "
    "les arrêter.",
    "sent_heading": "Consultez votre boîte de réception",
    "sent": "Si {address} peut recevoir nos e-mails, un message avec un lien de "
    "confirmation est en route. Ouvrez ce lien dans les {hours} heures pour recevoir les "
    "mises à jour\u00a0: rien ne vous est envoyé avant.",
    "sent_spam": "Rien après quelques minutes\u00a0? Regardez dans vos indésirables.",
    "code_heading": "Saisissez le code",
    "code_sent": "Nous avons envoyé un code à 6 chiffres par SMS au {address}. Il est "
    "valable {minutes} minutes.",
    "code_label": "Code",
    "verify": "Confirmer",
    "code_wrong": "Ce n'est pas le bon code. Essais restants\u00a0: {left}.",
    "code_locked": "Trop de codes erronés\u00a0: ce code ne fonctionne plus. Demandez-en un "
    "nouveau avec le formulaire d'abonnement.",
    "code_expired": "Ce code a expiré. Demandez-en un nouveau avec le formulaire d'abonnement.",
    "start_again": "S'abonner à nouveau",
    "confirmed_heading": "Vous êtes abonné",
    "confirmed_email": "Vous recevrez les mises à jour de {title} par e-mail.",
    "confirmed_sms": "Vous recevrez les mises à jour de {title} par SMS.",
    "used_heading": "Déjà confirmé",
    "used": "Cette confirmation a déjà servi\u00a0: l'abonnement est actif.",
    "manage_link": "Les modifier ou les arrêter à tout moment",
    "link_invalid_heading": "Ce lien ne fonctionne pas",
    "link_invalid": "Ce lien n'est pas valide. Vérifiez qu'il est complet, ou abonnez-vous "
    "à nouveau.",
    "link_expired_heading": "Ce lien a expiré",
    "link_expired": "Ce lien a expiré. Abonnez-vous à nouveau pour en recevoir un autre.",
    "manage_heading": "Vos mises à jour",
    "manage_channels": "Messages",
    "channel_email": "Par e-mail à {address}",
    "channel_sms": "Par SMS au {address}",
    "channel_telegram": "Sur Telegram",
    "channel_webhook": "Vers votre webhook {address}",
    "sms_stopped": "Les SMS au {address} sont arrêtés. Pour en recevoir à nouveau, "
    "abonnez-vous avec le formulaire ou envoyez START au numéro d'où ils venaient.",
    "telegram_stopped": "Les messages Telegram sont arrêtés. Pour en recevoir à nouveau, "
    "envoyez /subscribe à notre bot.",
    "webhook_stopped": "Les envois vers votre webhook {address} sont arrêtés.",
    "save": "Enregistrer",
    "unsubscribe_all": "Arrêter tous les messages",
    "saved": "Vos choix sont enregistrés.",
    "unsubscribed": "Vous ne recevrez plus de messages. Vous pouvez vous abonner à nouveau "
    "à tout moment.",
    "all_stopped": "Vous ne recevez aucun message pour l'instant.",
    "error_heading": "Vérifiez le formulaire",
    "invalid_email": "Ce n'est pas une adresse e-mail à laquelle nous pouvons écrire.",
    "invalid_phone": "Ce n'est pas un numéro de mobile auquel nous pouvons envoyer un SMS. "
    "Écrivez-le avec son indicatif, comme +33 6 12 34 56 78.",
    "address_missing": "Écrivez une adresse e-mail ou un numéro de mobile.",
    "email_off": "Les mises à jour par e-mail ne sont pas proposées ici.",
    "sms_off": "Les mises à jour par SMS ne sont pas proposées ici\u00a0: utilisez une "
    "adresse e-mail.",
    "sms_country": "Nous ne pouvons pas envoyer de SMS aux numéros de ce pays. "
    "Abonnez-vous plutôt par e-mail.",
    "sms_not_mobile": "Nous ne pouvons envoyer des SMS qu'à des numéros de mobile.",
    "no_component": "Choisissez au moins un sujet.",
    "form_expired": "Le formulaire avait expiré. Merci de l'envoyer à nouveau.",
    "cookie_missing": "Votre navigateur n'a pas renvoyé le cookie de ce formulaire. "
    "Autorisez les cookies pour ce site, puis envoyez à nouveau le formulaire.",
    "proof_failed": "La vérification qu'une personne utilise ce formulaire a échoué. "
    "Vérifiez que JavaScript est activé, puis envoyez à nouveau le formulaire.",
    "address_limit": "Trop de messages de confirmation sont partis vers cette adresse "
    "aujourd'hui. Réessayez demain.",
    "sms_cap": "L'abonnement par SMS est suspendu jusqu'à demain. Abonnez-vous par e-mail, "
    "ou réessayez plus tard.",
    "send_failed": "Nous n'avons pas pu envoyer le message. Réessayez dans quelques minutes.",
    "unavailable": "Les abonnements ne sont pas disponibles pour l'instant. Réessayez plus tard.",
    "confirm_subject": "Confirmez votre abonnement à {title}",
    "confirm_email": "Bonjour,\n\nQuelqu'un, sans doute vous, a demandé à recevoir les "
    "mises à jour de {title} à cette adresse.\n\nPour confirmer, ouvrez ce lien dans les "
    "{hours} heures\u00a0:\n{url}\n\nSi ce n'était pas vous, ignorez cet e-mail\u00a0: "
    "rien d'autre ne vous sera envoyé.",
    "confirm_sms": "{code} est votre code pour recevoir les mises à jour de {title}. Il "
    "est valable {minutes} minutes.",
}

_STRINGS: dict[str, dict[str, str]] = {"en": _EN, "fr": _FR}


def form_strings(language: str) -> dict[str, str]:
    """The self-service words for `language` (with the status page's own), English
    wherever there is no translation."""
    primary = language.replace("_", "-").split("-", 1)[0].lower()
    translated = _STRINGS.get(language) or _STRINGS.get(primary) or {}
    return {**strings_for(language), **_EN, **translated}
