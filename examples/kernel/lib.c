/* The few libc routines the kernel (and gcc's own struct copies) need, and formatting. */
#include "kernel.h"
#include "format.h"

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

static void emit_number(struct sink *s, u64 v, unsigned base, unsigned width, char pad, bool neg)
{
	char digits[24];
	unsigned n = 0;
	do {
		digits[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (neg)
		digits[n++] = '-';
	while (width-- > n)
		s->emit(s, pad);
	while (n)
		s->emit(s, digits[--n]);
}

/* Supports %[0][width][l]{d,u,x,s,c} and %%: all this kernel prints. */
void vformat(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			s->emit(s, *fmt);
			continue;
		}
		char pad = ' ';
		unsigned width = 0;
		bool is_long = false;
		if (*++fmt == '0')
			pad = '0', fmt++;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		if (*fmt == 'l')
			is_long = true, fmt++;
		switch (*fmt) {
		case 'd': {
			s64 v = is_long ? va_arg(ap, s64) : va_arg(ap, int);
			emit_number(s, v < 0 ? -(u64)v : (u64)v, 10, width, pad, v < 0);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = is_long ? va_arg(ap, u64) : va_arg(ap, unsigned);
			emit_number(s, v, *fmt == 'x' ? 16 : 10, width, pad, false);
			break;
		}
		case 's':
			for (const char *p = va_arg(ap, const char *); *p; p++)
				s->emit(s, *p);
			break;
		case 'c':
			s->emit(s, (char)va_arg(ap, int));
			break;
		default:
			s->emit(s, *fmt);
			if (!*fmt)
				return;
		}
	}
}

struct buf_sink {
	struct sink sink;
	char *buf;
	size_t len, cap;
};

static void buf_emit(struct sink *s, char c)
{
	struct buf_sink *b = (struct buf_sink *)s;
	if (b->len + 1 < b->cap)
		b->buf[b->len++] = c;
}

size_t format(char *buf, size_t cap, const char *fmt, ...)
{
	struct buf_sink b = { { buf_emit }, buf, 0, cap };
	va_list ap;
	va_start(ap, fmt);
	vformat(&b.sink, fmt, ap);
	va_end(ap);
	if (cap)
		buf[b.len] = 0;
	return b.len;
}
