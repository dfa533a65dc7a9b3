"""Search your images: an on-disk index of CLIP vectors (built and updated incrementally from folders, CSV/TSV
files and WebDataset shards), queries combining text, images and indexed items, exact and approximate top-k."""
from clipforge.search.index import Index, Item, SearchResult, is_database_url
from clipforge.search.query import Query, Term, parse_query

__all__ = ["Index", "Item", "Query", "SearchResult", "Term", "is_database_url", "parse_query"]
