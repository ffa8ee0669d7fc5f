"""What a sweep shows: Tables 1-2, figures, the gallery and `rcst explain` panels."""
