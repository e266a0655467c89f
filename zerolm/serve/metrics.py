"""GET /metrics: the server's counters in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

from zerolm.serve.jobs import TTFT_BUCKETS
from zerolm.serve.server import Server


def metrics_text(server: Server) -> str:
    """Prometheus text format (version 0.0.4)."""
    st, load = server.scheduler.stats, server.scheduler.load()
    lines = [
        "# HELP zerolm_requests_total Generation requests accepted.",
        "# TYPE zerolm_requests_total counter",
        f"zerolm_requests_total {st.requests}",
        "# HELP zerolm_request_errors_total Requests answered with an error status.",
        "# TYPE zerolm_request_errors_total counter",
        f"zerolm_request_errors_total {server.http_errors}",
        "# HELP zerolm_generated_tokens_total Tokens generated.",
        "# TYPE zerolm_generated_tokens_total counter",
        f"zerolm_generated_tokens_total {st.tokens}",
        "# HELP zerolm_queue_depth Sequences waiting for a slot.",
        "# TYPE zerolm_queue_depth gauge",
        f"zerolm_queue_depth {load['waiting']}",
        "# HELP zerolm_running_sequences Sequences in the decode batch.",
        "# TYPE zerolm_running_sequences gauge",
        f"zerolm_running_sequences {load['running']}",
        "# HELP zerolm_tokens_per_second Generated tokens per second over the last 10 s.",
        "# TYPE zerolm_tokens_per_second gauge",
        f"zerolm_tokens_per_second {server.scheduler.tokens_per_second():.3f}",
        "# HELP zerolm_time_to_first_token_seconds From submission to the first generated token.",
        "# TYPE zerolm_time_to_first_token_seconds histogram",
    ]
    for b in TTFT_BUCKETS:
        le = "+Inf" if b == float("inf") else f"{b:g}"
        lines.append(f'zerolm_time_to_first_token_seconds_bucket{{le="{le}"}} {st.ttft_buckets[b]}')
    lines += [
        f"zerolm_time_to_first_token_seconds_sum {st.ttft_sum:.6f}",
        f"zerolm_time_to_first_token_seconds_count {st.ttft_count}",
    ]
    return "\n".join(lines) + "\n"
