"""Bounded fault and soak run against a real `loragen-vllm serve` (issue 15 item 8, small CPU run)."""
