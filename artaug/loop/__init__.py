"""The loop layer: `artaug run`'s rounds (`runner`), the run's manifest, its observability and its report."""
