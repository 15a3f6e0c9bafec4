"""Local servers for the channels beyond push: SMTP, an SMS API, web push, chat webhooks.

They speak the real protocols (SMTP with STARTTLS and AUTH on aiosmtpd; Twilio's Messages API;
RFC 8030 web push with VAPID; Slack and Teams incoming webhooks), record what they accept, and
take faults through a control API (`control.py`, client `ChannelControl`).
`scripts.dev.local_providers` starts them with the APNs and FCM servers (`fanfare dev up`, the
demo, the tests' `providers` fixture).
"""
