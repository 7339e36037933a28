"""The kit's methods inside other libraries (TRL). Optional: nothing in the kit imports this package."""
