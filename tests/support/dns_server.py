"""A tiny authoritative DNS server on 127.0.0.1 (UDP, dnspython) serving records a test writes."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DNSServer:
    """``records`` maps (name, type) to a list of rdata texts, e.g.
    ``{("acme.com", "TXT"): ['"v=spf1 include:spf.sendcloud.org ~all"']}``. Unknown names get
    NXDOMAIN; a known name asked for another type gets an empty answer (NoAnswer)."""

    def __init__(self, records: dict[tuple[str, str], list[str]]):
        self.serve_records(records)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def serve_records(self, records: dict[tuple[str, str], list[str]]) -> None:
        """Answer from these records from now on (a zone being edited)."""
        self.records = {(name.lower().rstrip(".") + ".", kind.upper()): values for (name, kind), values in records.items()}

    def __enter__(self) -> DNSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower()
            kind = dns.rdatatype.to_text(question.rdtype)
            values = self.records.get((name, kind))
            if values:
                response.answer.append(dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN, kind, values))
            elif not any(known == name for known, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            self._sock.sendto(response.to_wire(), client)
