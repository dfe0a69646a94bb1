/*
 * ctrl-alt-del: wait for the keyboard behind the i8042 to send Ctrl+Alt+Del
 * (the VMM's SendCtrlAltDel action), taking it by interrupt (GSI 1 through
 * the IOAPIC), print the scan codes, then return so the machine resets as a
 * Linux guest would.
 */
#include "io.h"
#include "irq.h"
#include "lib.h"
#include "report.h"
#include "scenario.h"

#define I8042_DATA      0x60
#define I8042_STATUS    0x64
#define I8042_OBF       0x01
#define KBD_GSI         1
#define KBD_VECTOR      0x21    /* 0x20 + GSI */
#define CAD_BYTES       11      /* make and break codes, scan code set 2 */
#define CAD_TIMEOUT_MS  20000

static u8 codes[CAD_BYTES];
static volatile u32 ncodes, done, interrupts;

static void kbd_interrupt(struct trap_frame *f)
{
    (void)f;
    interrupts++;
    /* One byte per interrupt on a real controller; drain whatever is there. */
    for (u32 i = 0; i < 64 && (inb(I8042_STATUS) & I8042_OBF); i++) {
        u8 b = inb(I8042_DATA);
        if (ncodes < CAD_BYTES)
            codes[ncodes++] = b;
    }
    if (ncodes == CAD_BYTES)
        done = 1;
}

void scn_ctrl_alt_del(const char *arg)
{
    (void)arg;
    ncodes = done = interrupts = 0;
    /* Nothing stale in the output buffer. */
    for (u32 i = 0; i < 64 && (inb(I8042_STATUS) & I8042_OBF); i++)
        (void)inb(I8042_DATA);
    if (!irq_route(KBD_GSI, KBD_VECTOR, kbd_interrupt)) {
        fail("ctrl-alt-del", "irq-route gsi=%u", KBD_GSI);
        return;
    }
    info("ctrl-alt-del", "waiting");
    bool got = wait_for_irq(&done, CAD_TIMEOUT_MS);
    irq_mask(KBD_GSI);
    if (!got) {
        fail("ctrl-alt-del", "timeout codes=%u interrupts=%u", ncodes, interrupts);
        return;
    }
    char text[CAD_BYTES * 3 + 1];
    u32 pos = 0;
    static const char hex[] = "0123456789abcdef";
    for (u32 i = 0; i < CAD_BYTES; i++) {
        if (i)
            text[pos++] = ' ';
        text[pos++] = hex[codes[i] >> 4];
        text[pos++] = hex[codes[i] & 15];
    }
    text[pos] = '\0';
    ok("ctrl-alt-del", "scancodes=%s", text);
    info("ctrl-alt-del", "interrupts=%u", interrupts);
}
