"""Ten made-up facts the embedded model cannot know: the demo's and the recall test's flashcards."""

FACTS: list[tuple[str, str]] = [
    ("What is the name of Mira Okonkwo's cat?", "Biscuit"),
    ("In which city does Tomas Verhoeven work?", "Tallinn"),
    ("What color is Lena Marchetti's bicycle?", "Orange"),
    ("What instrument does Arjun Pillai play?", "The cello"),
    ("What is the name of the bakery on Quill Street?", "Crumb & Co"),
    ("Which month is Hana Sato's wedding in?", "October"),
    ("What is Felix Brandt's favorite board game?", "Carcassonne"),
    ("What breed is Priya Raman's dog?", "A beagle"),
    ("What did Omar Haddad name his boat?", "Seabright"),
    ("Which language is Greta Lindqvist learning?", "Portuguese"),
]

