/* printf-style formatting into any character sink (the UART, a buffer). */
#ifndef FORMAT_H
#define FORMAT_H

#include <stdarg.h>
#include "types.h"

struct sink {
	void (*emit)(struct sink *s, char c);
};

void vformat(struct sink *s, const char *fmt, va_list ap);
/* Formats into buf (always NUL-terminated when cap > 0); returns the length written. */
size_t format(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
