"""The prompt sets concept-erase writes itself (forget, surrogate, retain, class and style lists), one per line."""
