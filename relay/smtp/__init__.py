"""The SMTP front end: aiosmtpd's protocol (``protocol``), the DATA reader (``data``), the
handler hooks that ask policy and hand accepted mail to the intake (``session``, ``sasl``), and
the listening sockets (``listeners``). It never imports delivery: the process wiring gives it
an intake callable that spools a message and hands it on.
"""
