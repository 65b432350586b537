"""Operations on checkpoints (inspect, convert, ...), each planned from headers, then streamed."""
