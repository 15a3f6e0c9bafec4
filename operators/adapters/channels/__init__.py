"""Channel senders beyond mobile push: email (SMTP), SMS, web push, chat webhooks, in-app.

Each implements the delivery engine's `PushSender` port; `factory.build_channel_senders` makes
the configured ones for a worker, on its event loop.
"""
