"""Enrichment: tags, locations, attribution, lineage, watchlist lookup."""
