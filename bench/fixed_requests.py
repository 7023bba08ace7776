#!/usr/bin/env python3
"""Sends an exact number of requests for bench/instructions.sh (wrk cannot stop at a count).

    fixed_requests.py HOST:PORT PATH MODE COUNT CONNECTIONS NONCE

MODE is one of
  nokey   POSTs without an Idempotency-Key: passed through unprotected
  new     POSTs with a fresh key each ("i-NONCE-CONN-N"): claimed, forwarded, stored
  seed    like new, with keys "r-NONCE-1" .. "r-NONCE-COUNT", on one connection
  replay  POSTs cycling over the keys "r-NONCE-1" .. "r-NONCE-REPLAY_KEYS" (env, 100)
          that `seed` completed: each is answered from the store
with the body of bench/new_keys.lua, over CONNECTIONS keep-alive connections at once
(each sends its share one after another). Exits non-zero, saying why, if any answer is
not the expected one (201; a replay also `idempotent-replayed: true`), so a count is never
taken over failed requests.
"""

import http.client
import os
import sys
import threading

BODY = b'{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}'


def run(address, path, mode, count, connections, nonce):
    host, port = address.rsplit(":", 1)
    replay_keys = int(os.environ.get("REPLAY_KEYS", "100"))
    if mode == "seed":
        connections = 1
    shares = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
    failures = []

    def worker(index, share):
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        try:
            for n in range(share):
                headers = {"Content-Type": "application/json"}
                if mode == "new":
                    headers["Idempotency-Key"] = f"i-{nonce}-{index}-{n}"
                elif mode == "seed":
                    headers["Idempotency-Key"] = f"r-{nonce}-{n + 1}"
                elif mode == "replay":
                    # Connections start at different keys, as bench/replay.lua's threads do.
                    headers["Idempotency-Key"] = f"r-{nonce}-{(index * 37 + n) % replay_keys + 1}"
                conn.request("POST", path, body=BODY, headers=headers)
                response = conn.getresponse()
                response.read()
                replayed = response.getheader("idempotent-replayed") == "true"
                if response.status != 201 or replayed != (mode == "replay"):
                    failures.append(f"{mode} request {n} on connection {index}: {response.status}, replayed={replayed}")
                    return
        except Exception as error:  # noqa: BLE001 - any failure invalidates the count
            failures.append(f"{mode} on connection {index}: {error!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i, share)) for i, share in enumerate(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit("fixed_requests.py: " + failures[0])


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[3] not in ("nokey", "new", "seed", "replay"):
        sys.exit(__doc__)
    address, path, mode, count, connections, nonce = sys.argv[1:]
    run(address, path, mode, int(count), int(connections), nonce)
