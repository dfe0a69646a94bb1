/* Threads and memory for the Linux tier's workload (guest-kernel/rootfs/workload.sh): four
 * POSIX threads share a mutex-protected counter (futexes when they contend, with 2 vCPUs in
 * parallel), each returns a value to pthread_join, and an anonymous mapping is touched page
 * by page and checked. Prints one line and exits 0 when everything adds up. */
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>

#define THREADS 4
#define ROUNDS 2000
#define PAGES 64

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long total;

static void *work(void *arg)
{
	long n = (long)arg;

	for (int i = 0; i < ROUNDS; i++) {
		pthread_mutex_lock(&lock);
		total += n;
		pthread_mutex_unlock(&lock);
	}
	return (void *)(n * 100);
}

int main(void)
{
	pthread_t t[THREADS];
	long joined = 0;
	unsigned char *mem;
	int bad = 0;

	for (long i = 0; i < THREADS; i++)
		if (pthread_create(&t[i], NULL, work, (void *)(i + 1)))
			return 2;
	for (int i = 0; i < THREADS; i++) {
		void *ret;

		if (pthread_join(t[i], &ret))
			return 3;
		joined += (long)ret;
	}
	mem = mmap(NULL, PAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return 4;
	for (int p = 0; p < PAGES; p++)
		mem[p * 4096 + p] = (unsigned char)(p + 1);
	for (int p = 0; p < PAGES; p++)
		bad += mem[p * 4096 + p] != (unsigned char)(p + 1);
	munmap(mem, PAGES * 4096);
	printf("threads=%d total=%ld joined=%ld pages=%d bad=%d\n", THREADS, total, joined, PAGES, bad);
	return total == ROUNDS * 10L && joined == 1000 && bad == 0 ? 0 : 1;
}
